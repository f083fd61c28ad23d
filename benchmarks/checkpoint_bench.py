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

import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile

import torch
import torch.distributed.checkpoint as dcp

import shardopt

# isort: split
# the benchmark's own modules, next to this file
from common import arg_parser, back_to_back, write_results
from workload import mixed_params


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="shardopt-bench-", dir=args.dir))
    params = mixed_params(args.params)
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
    results["dd write (fdatasync)"] = back_to_back(
        lambda: subprocess.run(
            ["dd", "if=/dev/zero", f"of={dd_file}", "bs=4M", f"count={count}", "conv=fdatasync"],
            check=True,
            capture_output=True,
        ),
        args.repeats,
    )
    dd_file.unlink(missing_ok=True)
    results["gather state_dict()"] = back_to_back(opt.state_dict, args.repeats)
    results["torch.save of the gathered dict"] = back_to_back(
        lambda: torch.save(state_dict, root / "opt.pt"), args.repeats
    )
    (root / "opt.pt").unlink(missing_ok=True)
    results["dcp.save (one process)"] = back_to_back(
        lambda: dcp.save(state_dict, checkpoint_id=root / "dcp", no_dist=True),
        args.repeats,
        before=clean(root / "dcp"),
    )
    shutil.rmtree(root / "dcp", ignore_errors=True)
    results["shardopt save_checkpoint (2 shards)"] = back_to_back(
        lambda: opt.save_checkpoint(root / "ckpt"), args.repeats, before=clean(root / "ckpt")
    )
    key = os.urandom(32)
    results["shardopt save_checkpoint, signed"] = back_to_back(
        lambda: opt.save_checkpoint(root / "signed", key=key),
        args.repeats,
        before=clean(root / "signed"),
    )
    loader = shardopt.AdamW(mixed_params(args.params), lr=1e-3, num_shards=2)
    results["shardopt load_checkpoint (2 shards)"] = back_to_back(
        lambda: loader.load_checkpoint(root / "ckpt"), args.repeats
    )
    results["shardopt load_checkpoint, signed"] = back_to_back(
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
    write_results(
        "checkpoint_bench", {"args": vars(args), "state_bytes": nbytes, "seconds": results}
    )


if __name__ == "__main__":
    main()
