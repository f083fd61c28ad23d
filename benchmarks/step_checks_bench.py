"""What refusing torch's bad inputs before a step costs, against the step itself.

    python benchmarks/step_checks_bench.py [--counts 10,200,1000] [--repeats 200]

Every step starts with :class:`shardopt.core.step_checks.StepInputCheck`: each gradient against
its parameter's shape, dtype and device, and (the first time a kind of input appears) torch's
own optimizer run over stand-ins. For N parameters of 8x8 floats with gradients this times

* the check's first call (it asks torch) and its steady per-step cost;
* the anchors, in the same run: packing the same gradients into one flat buffer (what a step's
  data path does for them anyway) and torch's fused AdamW step over the same parameters.

Prints a table and writes ``benchmarks/results/step_checks_bench.json``.
"""

from __future__ import annotations

import statistics
import time

import torch

from shardopt.core.buffers import FlatLayout
from shardopt.core.param_groups import run_options
from shardopt.core.step_checks import StepInputCheck

# isort: split
# the benchmark's own module, next to this file
from common import arg_parser, back_to_back, run_meta, write_results


def measure(count: int, repeats: int) -> dict[str, float]:
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(count)]
    for p in params:
        p.grad = torch.ones_like(p)
    group = {"params": params, **torch.optim.AdamW(params).defaults}
    check = StepInputCheck(
        torch.optim.AdamW, {}, lambda options, ps: run_options(torch.optim.AdamW, options, ps)
    )
    start = time.perf_counter()
    check([group])
    first = time.perf_counter() - start
    layout = FlatLayout.for_tensors(params)
    flat = layout.empty()
    grads = [p.grad for p in params]

    def pack() -> None:
        for j, grad in enumerate(grads):
            layout.view(flat, j).copy_(grad)

    fused = torch.optim.AdamW(params, fused=True)
    timings = {
        "check": back_to_back(lambda: check([group]), repeats),
        "pack": back_to_back(pack, repeats),
        "fused AdamW step": back_to_back(fused.step, repeats),
    }
    result = {name: statistics.median(s) * 1e3 for name, s in timings.items()}
    result["first check"] = first * 1e3
    return result


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--counts", default="10,200,1000", help="parameter counts")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    rows = {count: measure(count, args.repeats) for count in counts}
    print(f"median of {args.repeats} calls, ms; 8x8 float32 parameters with gradients")
    header = f"{'params':>7}{'first check':>13}{'check':>9}{'pack':>9}{'AdamW':>9}"
    print(header + f"{'check/pack':>12}{'check/AdamW':>13}{'us/param':>10}")
    for count, r in rows.items():
        print(
            f"{count:>7}{r['first check']:>13.2f}{r['check']:>9.3f}{r['pack']:>9.3f}"
            f"{r['fused AdamW step']:>9.3f}{r['check'] / r['pack']:>12.2f}"
            f"{r['check'] / r['fused AdamW step']:>13.2f}{r['check'] * 1e3 / count:>10.2f}"
        )
    write_results("step_checks_bench", {"meta": run_meta(), "args": vars(args), "ms": rows})


if __name__ == "__main__":
    main()
