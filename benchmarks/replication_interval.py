"""Per-step cost of replication: off, every step (``replicate=True``), every k steps
(``replica_refresh=k``).

    python benchmarks/replication_interval.py [--params 10_000_000] [--every 10] [--steps 20]

One process, local Ray, AdamW over 2 shards; the configurations take turns every round so
that noise hits all of them. Prints median ``opt.step()`` ms and the ratio to no replication,
and writes benchmarks/results/replication_interval.json. (benchmarks/ft_bench.py measures
recovery and the training-step variants for ``replicate=True``.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

import shardopt

# isort: split
# the benchmark's own module, next to this file
from common import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    torch.manual_seed(0)
    rows = 4
    shape = (rows, args.params // rows // 4 * 4)
    base = [torch.randn(shape[1] // 1000 or 1, 1000) for _ in range(rows)]
    grads = [torch.randn_like(t) for t in base]
    configs = {
        "off": {},
        "every step": {"replicate": True},
        f"every {args.every}": {"replicate": True, "replica_refresh": args.every},
    }
    opts = {}
    for name, options in configs.items():
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opts[name] = (params, shardopt.AdamW(params, lr=1e-3, num_shards=2, **options))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.warmup + args.steps):
        for name in configs:
            params, opt = opts[name]
            for p, g in zip(params, grads):
                p.grad = g
            start = time.perf_counter()
            opt.step()
            if round_ >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    for _, opt in opts.values():
        opt.close()
    numel = sum(t.numel() for t in base)
    off = statistics.median(times["off"])
    print(f"AdamW, {numel:,} float32 params, 2 shards; median of {args.steps} steps")
    print(f"{'replication':14s} {'ms':>8s} {'x off':>7s}")
    for name in configs:
        median = statistics.median(times[name])
        print(f"{name:14s} {median:8.1f} {median / off:7.2f}")
    out = write_results("replication_interval", {"params": numel, "ms": times})
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
