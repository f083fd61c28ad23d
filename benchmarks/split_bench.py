"""Tensors split across shards: step time with one dominant tensor, and a sparse step's bytes.

    python benchmarks/split_bench.py [--rows 32000,256000] [--shards 4] [--repeats 30]

1. **Dominant embedding.** An embedding of ROWS x 64 (dense gradients) and four 64x64 linear
   layers, AdamW, 4 shards: the proxy's ``step()`` with whole tensors (``split=False``: the
   embedding decides one shard's bytes and time) against split tensors (the default), timed in
   rotation in one run. The anchor is torch's own AdamW (fused, as the shards run it) over the
   same tensors in this process. Also each plan's largest shard against the mean.
2. **Sparse rows.** ``nn.Embedding(100000, 64, sparse=True)`` with SparseAdam on 4 shards over
   the object store, 512 ids a step: the bytes a step sends to the shards and gets back (every
   numpy array in the requests and results, counted at the real calls), against the dense
   equivalent (Adam on the same embedding with dense gradients), and both steps' times.

Prints a table and writes ``benchmarks/results/split_bench.json``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

import shardopt
from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get

# isort: split
# the benchmark's own module, next to this file
from common import arg_parser, logger, publish, round_robin, run_meta

log = logger("split_bench")


def _model(rows: int) -> list[nn.Parameter]:
    torch.manual_seed(0)
    layers = [nn.Embedding(rows, 64)] + [nn.Linear(64, 64) for _ in range(4)]
    return [p for layer in layers for p in layer.parameters()]


def _with_grads(params: list[nn.Parameter]) -> list[nn.Parameter]:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _balance(plan: Any) -> float:
    return max(plan.shard_bytes) / (sum(plan.shard_bytes) / plan.num_shards)


def dominant(rows: int, shards: int, repeats: int) -> dict[str, Any]:
    """Step times, whole against split, with torch's AdamW as the anchor."""
    whole_params, split_params, torch_params = (_with_grads(_model(rows)) for _ in range(3))
    whole = shardopt.AdamW(whole_params, lr=1e-3, num_shards=shards, split=False)
    split = shardopt.AdamW(split_params, lr=1e-3, num_shards=shards)
    anchor = torch.optim.AdamW(torch_params, lr=1e-3, fused=True)
    try:
        samples = round_robin(
            {"torch": anchor.step, "whole": whole.step, "split": split.step}, 3, repeats
        )
        ms = {name: s.median_ms for name, s in samples.items()}
        return {
            "rows": rows,
            "ms": ms,
            "split_vs_whole": ms["whole"] / ms["split"],
            "whole_vs_torch": ms["whole"] / ms["torch"],
            "split_vs_torch": ms["split"] / ms["torch"],
            "largest_shard_vs_mean": {"whole": _balance(whole.plan), "split": _balance(split.plan)},
        }
    finally:
        whole.close()
        split.close()


def _nbytes(value: Any) -> int:
    """Bytes of every numpy array in a request or result (what crosses to or from a shard)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


class _Traffic:
    """Counts the arrays of every step request and result at the real shard calls."""

    def __init__(self) -> None:
        self.sent = self.returned = 0
        self._refs: list[Any] = []
        self._original = ShardHandle.step

    def __enter__(self) -> _Traffic:
        traffic = self

        def step(handle: ShardHandle, request: Any) -> Any:
            traffic.sent += _nbytes(request)
            ref = traffic._original(handle, request)
            traffic._refs.append(ref)
            return ref

        ShardHandle.step = step  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ShardHandle.step = self._original  # type: ignore[method-assign]

    def collect(self) -> None:
        self.returned += sum(_nbytes(r) for r in ray_get(self._refs))
        self._refs.clear()


def sparse(shards: int, steps: int, rows: int = 100_000, batch: int = 512) -> dict[str, Any]:
    """Bytes and time of a sparse SparseAdam step against the dense equivalent."""
    out: dict[str, Any] = {"rows": rows, "batch": batch}
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, rows, (batch,), generator=gen) for _ in range(steps)]
    for kind in ("sparse", "dense"):
        torch.manual_seed(0)
        model = nn.Embedding(rows, 64, sparse=kind == "sparse")
        cls = shardopt.SparseAdam if kind == "sparse" else shardopt.Adam
        opt = cls(model.parameters(), lr=1e-3, num_shards=shards, shared_memory=False)
        times = []
        try:
            with _Traffic() as traffic:
                for k, batch_ids in enumerate(ids):
                    opt.zero_grad()
                    model(batch_ids).square().sum().backward()
                    start = time.perf_counter()
                    opt.step()
                    if k:  # the first step is a warm-up
                        times.append((time.perf_counter() - start) * 1e3)
                    traffic.collect()
            out[kind] = {
                "pieces": len(opt.plan.pieces[0]),
                "sent_bytes_per_step": traffic.sent / steps,
                "returned_bytes_per_step": traffic.returned / steps,
                "step_ms": statistics.median(times),
            }
        finally:
            opt.close()
    total = {
        kind: out[kind]["sent_bytes_per_step"] + out[kind]["returned_bytes_per_step"]
        for kind in ("sparse", "dense")
    }
    out["dense_vs_sparse_bytes"] = total["dense"] / total["sparse"]
    out["dense_vs_sparse_ms"] = out["dense"]["step_ms"] / out["sparse"]["step_ms"]
    return out


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--rows", default="32000,256000", help="embedding rows (part 1)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    started = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    report: dict[str, Any] = {"meta": run_meta(), "args": vars(args)}
    report["dominant"] = []
    for rows in [int(r) for r in args.rows.split(",") if r.strip()]:
        log(f"dominant embedding {rows}x64 on {args.shards} shards")
        report["dominant"].append(dominant(rows, args.shards, args.repeats))
    log("sparse rows")
    report["sparse"] = sparse(args.shards, args.repeats)
    report["meta"]["seconds"] = time.time() - started
    lines = [
        f"1. step() median ms, AdamW, {args.shards} shards, embedding ROWSx64 + 4 x Linear(64, 64)",
        f"{'rows':>8}{'torch':>9}{'whole':>9}{'split':>9}{'whole/split':>13}"
        f"{'split/torch':>13}{'max/mean whole':>16}{'split':>7}",
    ]
    for r in report["dominant"]:
        ms, bal = r["ms"], r["largest_shard_vs_mean"]
        lines.append(
            f"{r['rows']:>8}{ms['torch']:>9.2f}{ms['whole']:>9.2f}{ms['split']:>9.2f}"
            f"{r['split_vs_whole']:>13.2f}{r['split_vs_torch']:>13.2f}"
            f"{bal['whole']:>16.2f}{bal['split']:>7.2f}"
        )
    s = report["sparse"]
    lines += [
        "",
        f"2. Embedding({s['rows']}, 64), {s['batch']} ids a step, {args.shards} shards, "
        "object store",
        f"{'':>8}{'pieces':>8}{'sent B':>12}{'returned B':>12}{'step ms':>9}",
    ]
    for kind in ("sparse", "dense"):
        k = s[kind]
        lines.append(
            f"{kind:>8}{k['pieces']:>8}{k['sent_bytes_per_step']:>12.0f}"
            f"{k['returned_bytes_per_step']:>12.0f}{k['step_ms']:>9.2f}"
        )
    lines.append(
        f"dense/sparse: {s['dense_vs_sparse_bytes']:.1f}x the bytes, "
        f"{s['dense_vs_sparse_ms']:.1f}x the step time"
    )
    publish("split_bench", report, "\n".join(lines))


if __name__ == "__main__":
    main()
