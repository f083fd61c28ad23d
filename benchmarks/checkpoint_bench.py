"""Checkpoint save/load bandwidth: shardopt against dd, torch.save and dcp.save on the same disk.

For an AdamW state over ``--params`` float32 parameters (after one step), in one run:
- ``dd``: write bandwidth of the disk (``dd if=/dev/zero bs=4M conv=fdatasync``, same size);
- ``torch.save`` of the gathered ``opt.state_dict()`` (the gather timed separately);
- ``dcp.save`` of the same state dict from this process (no process group);
- shardopt ``save_checkpoint`` (2 shards writing in parallel, fsync'd, checksums, commit) and
  ``load_checkpoint`` (commit record checked, each shard reading its own part and checking every
  slice's checksum), also with a signing key (HMAC-SHA256 of the commit record).
Figures are medians of ``--repeats``; GB/s counts the optimizer state's bytes.

    python benchmarks/checkpoint_bench.py [--params 50000000] [--repeats 3] [--dir /tmp]

Writes benchmarks/results/checkpoint_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

import shardopt


def make_params(n: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(n // 4,), (n // 8, 1)] + [(1000, (n * 5 // 8) // 1000 // 4)] * 4
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def timed(fn, repeats: int, before=None) -> list[float]:
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="shardopt-bench-", dir=args.dir))
    params = make_params(args.params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = shardopt.AdamW(params, lr=1e-3, num_shards=2)
    opt.step()
    state_dict = opt.state_dict()
    nbytes = sum(
        v.numel() * v.element_size() for s in state_dict["state"].values() for v in s.values()
    )
    results: dict[str, list[float]] = {}

    def clean(path: pathlib.Path):
        return lambda: shutil.rmtree(path, ignore_errors=True)

    dd_file = root / "dd.bin"
    count = max(1, nbytes // (4 << 20))
    results["dd write (fdatasync)"] = timed(
        lambda: subprocess.run(
            ["dd", "if=/dev/zero", f"of={dd_file}", "bs=4M", f"count={count}", "conv=fdatasync"],
            check=True,
            capture_output=True,
        ),
        args.repeats,
    )
    dd_file.unlink(missing_ok=True)
    results["gather state_dict()"] = timed(opt.state_dict, args.repeats)
    results["torch.save of the gathered dict"] = timed(
        lambda: torch.save(state_dict, root / "opt.pt"), args.repeats
    )
    (root / "opt.pt").unlink(missing_ok=True)
    results["dcp.save (one process)"] = timed(
        lambda: dcp.save(state_dict, checkpoint_id=root / "dcp", no_dist=True),
        args.repeats,
        before=clean(root / "dcp"),
    )
    shutil.rmtree(root / "dcp", ignore_errors=True)
    results["shardopt save_checkpoint (2 shards)"] = timed(
        lambda: opt.save_checkpoint(root / "ckpt"), args.repeats, before=clean(root / "ckpt")
    )
    key = os.urandom(32)
    results["shardopt save_checkpoint, signed"] = timed(
        lambda: opt.save_checkpoint(root / "signed", key=key),
        args.repeats,
        before=clean(root / "signed"),
    )
    loader = shardopt.AdamW(make_params(args.params), lr=1e-3, num_shards=2)
    results["shardopt load_checkpoint (2 shards)"] = timed(
        lambda: loader.load_checkpoint(root / "ckpt"), args.repeats
    )
    results["shardopt load_checkpoint, signed"] = timed(
        lambda: loader.load_checkpoint(root / "signed", key=key), args.repeats
    )
    loader.close()
    opt.close()
    shutil.rmtree(root, ignore_errors=True)

    dd = statistics.median(results["dd write (fdatasync)"])
    gather = statistics.median(results["gather state_dict()"])
    print(
        f"AdamW state of {args.params:,} params: {nbytes / 1e9:.2f} GB, on {args.dir}, "
        f"median of {args.repeats}"
    )
    print(f"{'operation':<40}{'s':>8}{'GB/s':>8}{'x dd bw':>9}")
    for name, samples in results.items():
        med = statistics.median(samples)
        if name.startswith("torch.save"):
            name, med = name + " + gather", med + gather
        print(f"{name:<40}{med:>8.2f}{nbytes / med / 1e9:>8.2f}{dd / med:>9.2f}")
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "checkpoint_bench.json").write_text(
        json.dumps({"args": vars(args), "state_bytes": nbytes, "seconds": results}, indent=2)
    )


if __name__ == "__main__":
    main()
