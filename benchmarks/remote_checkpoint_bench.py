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

Figures are medians of ``--repeats``, after one untimed save and load per shard count (each
shard process starts its s3fs client); MB/s counts the optimizer state's bytes; ``x put`` is
the bandwidth over the single-stream put's (``x get``: over the single-stream get's; ``x N
puts``: a save's over that of as many processes putting at once as it has shards). The
server shares this machine's CPUs with the shards, so the ratios say how shardopt's parallel
writers use one server, not a cloud's.

    python benchmarks/remote_checkpoint_bench.py [--params 50M] [--shards 2,4] [--repeats 2]

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
    back_to_back,
    fixed,
    logger,
    parse_size,
    publish,
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


def parallel_puts(blob: pathlib.Path, remote: str, count: int, repeats: int) -> list[float]:
    """The seconds of ``count`` processes putting 1/``count`` of ``blob`` each, at once, one
    stream each: what the server gives as many writers as shards (processes started, and
    their clients connected, before the clock starts)."""
    data = blob.read_bytes()
    step = -(-len(data) // count)
    parts = []
    for i in range(count):
        part = blob.with_name(f"{blob.name}.{i}")
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append((str(part), f"{remote}.{i}"))
    del data
    try:
        with multiprocessing.get_context("spawn").Pool(count, initializer=_start_worker) as pool:
            tiny = blob.with_name(f"{blob.name}.tiny")
            tiny.write_bytes(b"warm-up")
            pool.starmap(_put, [(str(tiny), f"{name}.warm-up") for _, name in parts], 1)
            tiny.unlink()
            return back_to_back(lambda: pool.starmap(_put, parts, 1), repeats)
    finally:
        for local, _ in parts:
            pathlib.Path(local).unlink(missing_ok=True)


def anchors(
    fs: Any, opt: torch.optim.Optimizer, bucket: str, counts: list[int], args: Any
) -> dict[str, list[float]]:
    """s3fs put/get of the state's bytes (``torch.save`` of the gathered state dict): one
    stream, one stream with parts in flight, and as many processes as shards."""
    blob = pathlib.Path(args.dir) / f"shardopt-bench-{uuid.uuid4().hex[:8]}.pt"
    torch.save(opt.state_dict(), blob)
    remote = f"{bucket.removeprefix('s3://')}/anchor/state.pt"
    log(f"anchors: s3fs put/get of {blob.stat().st_size / 1e6:.0f} MB")
    fs.pipe_file(remote, b"warm-up")  # the connection, the server's first request
    fs.cat_file(remote)
    try:
        results = {
            "s3fs put, one stream": back_to_back(
                lambda: fs.put_file(str(blob), remote, max_concurrency=1), args.repeats
            ),
            "s3fs put, 10 parts in flight": back_to_back(
                lambda: fs.put_file(str(blob), remote, max_concurrency=10), args.repeats
            ),
            "s3fs get, one stream": back_to_back(
                lambda: fs.get_file(remote, str(blob)), args.repeats
            ),
        }
        for count in counts:
            log(f"anchor: {count} processes put 1/{count} of the bytes each, at once")
            results[f"s3fs put, {count} processes"] = parallel_puts(
                blob, remote, count, args.repeats
            )
        return results
    finally:
        blob.unlink(missing_ok=True)
        fs.rm(f"{bucket.removeprefix('s3://')}/anchor", recursive=True)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--params", type=parse_size, default=parse_size("50M"))
    parser.add_argument("--shards", default="2,4", help="shard counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
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

    try:
        fs = s3.filesystem()
        bucket = s3.bucket(f"bench-{uuid.uuid4().hex[:8]}")
        results: dict[str, list[float]] = {}
        nbytes = 0
        for count in shard_counts:
            log(f"{count} shards: an AdamW state over {args.params:,} params")
            params = mixed_params(args.params)
            for p in params:
                p.grad = torch.randn_like(p)
            opt = shardopt.AdamW(params, lr=1e-3, num_shards=count)
            opt.step()
            nbytes = state_bytes(opt)
            if count == shard_counts[0]:
                results |= anchors(fs, opt, bucket, shard_counts, args)
            url = f"{bucket}/shardopt-{count}"
            log(f"warm-up: one save and load with {count} shards (s3fs starts in each shard)")
            opt.save_checkpoint(url)
            opt.load_checkpoint(url)
            log(f"save_checkpoint({url!r}) with {count} shards")
            results[f"shardopt save, {count} shards"] = back_to_back(
                lambda url=url, opt=opt: opt.save_checkpoint(url), args.repeats
            )
            log(f"load_checkpoint with {count} shards")
            results[f"shardopt load, {count} shards"] = back_to_back(
                lambda url=url, opt=opt: opt.load_checkpoint(url), args.repeats
            )
            local = pathlib.Path(args.dir) / f"shardopt-bench-{uuid.uuid4().hex[:8]}"
            log(f"reference: save and load with {count} shards to {local}")
            try:
                opt.save_checkpoint(local)
                results[f"local dir save, {count} shards"] = back_to_back(
                    lambda local=local, opt=opt: opt.save_checkpoint(local), args.repeats
                )
                results[f"local dir load, {count} shards"] = back_to_back(
                    lambda local=local, opt=opt: opt.load_checkpoint(local), args.repeats
                )
            finally:
                shutil.rmtree(local, ignore_errors=True)
            opt.close()
            del opt, params
    finally:
        s3.stop()

    put = statistics.median(results["s3fs put, one stream"])
    get = statistics.median(results["s3fs get, one stream"])
    lines = [
        f"AdamW state of {args.params:,} params: {nbytes / 1e6:.0f} MB, local S3 server "
        f"(moto), median of {args.repeats}",
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
