"""Checkpoints in object storage: shardopt's save/load to an S3 server against s3fs put/get.

A local S3-compatible server (moto's, in its own process on 127.0.0.1: ``moto[server]`` and
``s3fs`` from the ``test`` extra) holds everything. For an AdamW state over ``--params``
float32 parameters (after one step), in one run:

- anchors: the same bytes (``torch.save`` of the gathered state dict, in a local file) put to
  the server with ``s3fs`` ``put_file`` as one stream (``max_concurrency=1``, what ``aws s3
  cp`` of one file does without multipart concurrency), and got back with ``get_file``; and the
  same put with s3fs's default of 10 parts in flight; and the same bytes put by 2 (and 4)
  processes at once, one stream and 1/N of the bytes each: what the server gives as many
  writers as shards;
- shardopt ``save_checkpoint("s3://...")`` with 2 and 4 shards, every shard uploading its own
  object from its actor, digests computed as the bytes go out, then the commit record and
  ``.metadata``; ``load_checkpoint`` with as many shards, every shard reading and checking its
  own slices;
- for reference, the same saves and loads with as many shards to a local directory (``--dir``):
  shardopt's own work (snapshot, serialization, checksums, fsync) without the store.

Every configuration runs once per round, in an order that rotates every round (this machine is
shared: load drifts); the first round is not timed (every shard and put process makes its s3fs
client then). Figures are medians of ``--repeats`` rounds; MB/s counts the optimizer state's
bytes; ``x put`` is the bandwidth over the single-stream put's (``x get``: over the
single-stream get's; ``x N puts``: a save's over that of as many processes putting at once as
it has shards). The server shares this machine's CPUs with the shards, so the ratios say how
shardopt's parallel writers use one server, not a cloud's.

    python benchmarks/remote_checkpoint_bench.py [--params 50M] [--shards 2,4] [--repeats 3]

Writes benchmarks/results/remote_checkpoint_bench.json.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any

import torch

# isort: split
# the benchmark's own modules, next to this file
from common import (
    RESULTS,
    arg_parser,
    fixed,
    logger,
    parse_size,
    publish,
    round_robin,
    run_meta,
)
from workload import mixed_params

log = logger("remote_checkpoint_bench")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state_dict()["state"].values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


_WORKER_FS: Any = None
"""A put worker's s3fs file system (its environment names the server, as the shards' does)."""


def _start_worker() -> None:
    global _WORKER_FS
    import fsspec

    _WORKER_FS = fsspec.filesystem("s3", use_listings_cache=False)


def _put(local: str, remote: str) -> None:
    _WORKER_FS.put_file(local, remote, max_concurrency=1)


class ParallelPuts:
    """``count`` processes that put 1/``count`` of a file each, at once, one stream each: what
    the server gives as many writers as shards (processes started, and their clients made,
    before any timing)."""

    def __init__(self, blob: pathlib.Path, remote: str, count: int) -> None:
        data = blob.read_bytes()
        step = -(-len(data) // count)
        self.parts = []
        for i in range(count):
            part = blob.with_name(f"{blob.name}.{i}")
            part.write_bytes(data[i * step : (i + 1) * step])
            self.parts.append((str(part), f"{remote}.{i}"))
        self.pool = multiprocessing.get_context("spawn").Pool(count, initializer=_start_worker)

    def __call__(self) -> None:
        self.pool.starmap(_put, self.parts, 1)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        for local, _ in self.parts:
            pathlib.Path(local).unlink(missing_ok=True)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--params", type=parse_size, default=parse_size("50M"))
    parser.add_argument("--shards", default="2,4", help="shard counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="for the anchor's file and the local saves"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="the JSON's folder")
    args = parser.parse_args()
    shard_counts = [int(n) for n in args.shards.split(",") if n.strip()]
    started = time.monotonic()

    from shardopt.testing import LocalS3

    s3 = LocalS3().start()
    os.environ.update(s3.env)  # before Ray starts: the shards' actors inherit it
    import shardopt

    work = pathlib.Path(tempfile.mkdtemp(prefix="shardopt-bench-", dir=args.dir))
    optimizers, pools = [], []
    try:
        fs = s3.filesystem()
        bucket = s3.bucket(f"bench-{uuid.uuid4().hex[:8]}")
        root = bucket.removeprefix("s3://")
        steps: dict[str, Any] = {}
        for count in shard_counts:
            log(f"{count} shards: an AdamW state over {args.params:,} params")
            params = mixed_params(args.params)
            for p in params:
                p.grad = torch.randn_like(p)
            opt = shardopt.AdamW(params, lr=1e-3, num_shards=count)
            opt.step()
            optimizers.append(opt)
            url, local = f"{bucket}/shardopt-{count}", work / f"shardopt-{count}"
            steps[f"shardopt save, {count} shards"] = lambda o=opt, u=url: o.save_checkpoint(u)
            steps[f"shardopt load, {count} shards"] = lambda o=opt, u=url: o.load_checkpoint(u)
            steps[f"local dir save, {count} shards"] = lambda o=opt, d=local: o.save_checkpoint(d)
            steps[f"local dir load, {count} shards"] = lambda o=opt, d=local: o.load_checkpoint(d)
        nbytes = state_bytes(optimizers[0])
        blob = work / "state.pt"
        torch.save(optimizers[0].state_dict(), blob)
        remote = f"{root}/anchor/state.pt"
        log(f"anchors: s3fs put/get of {blob.stat().st_size / 1e6:.0f} MB")
        anchor_steps = {
            "s3fs put, one stream": lambda: fs.put_file(str(blob), remote, max_concurrency=1),
            "s3fs put, 10 parts in flight": lambda: fs.put_file(
                str(blob), remote, max_concurrency=10
            ),
            "s3fs get, one stream": lambda: fs.get_file(remote, str(work / "got.pt")),
        }
        for count in shard_counts:
            pools.append(ParallelPuts(blob, f"{root}/anchor/part", count))
            anchor_steps[f"s3fs put, {count} processes"] = pools[-1]
        fs.put_file(str(blob), remote)  # what the gets read, from the first round on
        # every configuration once per round, the order rotating: the first round (every
        # shard's and worker's s3fs client made, the checkpoints there to load) is not timed
        log(f"{1 + args.repeats} rounds of {len(steps) + len(anchor_steps)} configurations")
        samples = round_robin(anchor_steps | steps, warmup=1, repeats=args.repeats)
        failed = {name: s.error for name, s in samples.items() if s.error is not None}
        if failed:
            raise RuntimeError(f"configurations failed: {failed}")
        results = {name: [ms / 1e3 for ms in s.samples_ms] for name, s in samples.items()}
    finally:
        for pool in pools:
            pool.close()
        for opt in optimizers:
            opt.close()
        shutil.rmtree(work, ignore_errors=True)
        s3.stop()

    put = statistics.median(results["s3fs put, one stream"])
    get = statistics.median(results["s3fs get, one stream"])
    lines = [
        f"AdamW state of {args.params:,} params: {nbytes / 1e6:.0f} MB, local S3 server "
        f"(moto), median of {args.repeats} rounds",
        f"{'operation':<32}{'s':>8}{'MB/s':>9}{'x put':>8}{'x get':>8}{'x N puts':>10}",
    ]
    for name, samples in results.items():
        med = statistics.median(samples)
        remote = not name.startswith("local")
        anchor_put = put / med if remote and ("save" in name or "put" in name) else None
        anchor_get = get / med if remote and ("load" in name or "get" in name) else None
        count = name.split(", ")[-1].split()[0]
        parallel = results.get(f"s3fs put, {count} processes")
        anchor_parallel = None
        if name.startswith("shardopt save") and parallel:
            anchor_parallel = statistics.median(parallel) / med
        lines.append(
            f"{name:<32}{med:>8.2f}{nbytes / med / 1e6:>9.1f}"
            f"{fixed(anchor_put, 8)}{fixed(anchor_get, 8)}{fixed(anchor_parallel, 10)}"
        )
    meta = run_meta() | {"seconds": time.monotonic() - started}
    report = {
        "meta": meta,
        "args": vars(args) | {"out": str(args.out)},
        "state_bytes": nbytes,
        "seconds": results,
    }
    publish("remote_checkpoint_bench", report, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
