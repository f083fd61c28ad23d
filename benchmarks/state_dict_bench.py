"""Gathering a 50M-parameter AdamW state dict: shardopt against ZeroRedundancyOptimizer.

- shardopt: ``opt.state_dict()`` with 2 shards (each shard packs its state into a shared-memory
  file while the proxy unpacks the previous one; over Ray's object store with
  ``shared_memory=False``);
- ZeRO: ``ZeroRedundancyOptimizer(AdamW)`` on 2 gloo processes (127.0.0.1), timed as
  ``consolidate_state_dict(to=0)`` on both ranks plus ``state_dict()`` on rank 0.

Each figure is the median of ``--repeats`` runs in one process run; throughput is the bytes of
optimizer state gathered (exp_avg, exp_avg_sq, step) per second.

Client memory: for each of ``--memory-params`` (50M and 200M parameters by default) a fresh
process per operation builds the optimizer (2 shards), steps once, drops its gradients and
hands freed memory back to the system (``malloc_trim``); then the growth of its peak RSS over
the operation, against the bytes of the state: ``state_dict()`` over shared memory and over
the object store, ``load_state_dict`` of that dict, ``save_state_dict(path)`` (the streaming
save), and ``load_state_dict`` of that file mapped by ``torch.load(path, mmap=True)`` (its
pages, read from the file as the shards' parts are packed, count in the RSS too).

    python benchmarks/state_dict_bench.py [--params 50000000] [--repeats 5]
        [--memory-params 50M,200M]

Writes benchmarks/results/state_dict_bench.json.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# isort: split
# the benchmark's own modules, next to this file
from common import (
    LOOPBACK,
    arg_parser,
    fixed,
    free_port,
    parse_size,
    peak_rss_bytes,
    reset_peak_rss,
    write_results,
)
from workload import mixed_params


def state_bytes(state_dict: dict) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in state_dict["state"].values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def _zero_worker(rank: int, port: int, n: int, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = mixed_params(n)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
    opt.step()
    times, nbytes = [], 0
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            sd = opt.state_dict()
            nbytes = state_bytes(sd)
            del sd
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put({"seconds": times, "bytes": nbytes})
    dist.destroy_process_group()


def zero_anchor(n: int, repeats: int) -> dict:
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_zero_worker, args=(r, port, n, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


def shardopt_run(n: int, repeats: int, shared_memory: bool) -> dict:
    import shardopt

    params = mixed_params(n)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = shardopt.AdamW(params, lr=1e-3, num_shards=2, shared_memory=shared_memory)
    opt.step()
    times, nbytes = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        sd = opt.state_dict()
        times.append(time.perf_counter() - start)
        nbytes = state_bytes(sd)
        del sd
    opt.close()
    return {"seconds": times, "bytes": nbytes}  # memory: see memory_table


MEMORY_OPS = ("state_dict (shared memory)", "state_dict (object store)", "load_state_dict",
              "save_state_dict", "load_state_dict (mmap file)")  # fmt: skip


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _memory_probe(n: int, op: str, address: str, out: str, queue) -> None:
    """In a fresh process: the client's peak RSS growth over one operation (see the docstring)."""
    import ctypes
    import gc

    import ray

    import shardopt

    ray.init(address=address, log_to_driver=False)
    params = mixed_params(n)
    for p in params:
        p.grad = torch.randn_like(p)
    shared = op != "state_dict (object store)"
    opt = shardopt.AdamW(params, lr=1e-3, num_shards=2, shared_memory=shared)
    opt.step()
    for p in params:
        p.grad = None
    loaded = opt.state_dict() if op == "load_state_dict" else None
    nbytes = state_bytes(loaded) if loaded is not None else None
    if op == "load_state_dict (mmap file)":  # the streaming save's file, mapped, not read
        opt.save_state_dict(out)
        loaded = torch.load(out, weights_only=True, mmap=True)
        nbytes = state_bytes(loaded)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_rss()
    base = _rss()
    start = time.perf_counter()
    if op.startswith("load_state_dict"):
        opt.load_state_dict(loaded)
    elif op == "save_state_dict":
        opt.save_state_dict(out)
    else:
        result = opt.state_dict()
        nbytes = state_bytes(result)
    seconds = time.perf_counter() - start
    growth = peak_rss_bytes() - base
    if op == "save_state_dict":
        nbytes = state_bytes(torch.load(out, weights_only=True, mmap=True))
    if os.path.exists(out):
        os.unlink(out)
    opt.close()
    queue.put({"growth_mb": growth / 2**20, "state_mb": nbytes / 2**20, "x_state": growth / nbytes,
               "seconds": seconds})  # fmt: skip


def memory_table(sizes: list[int]) -> dict:
    """Each operation at each size in a process of its own (clean peaks)."""
    import tempfile

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    ctx = mp.get_context("spawn")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for op in MEMORY_OPS:
                queue = ctx.Queue()
                args = (n, op, address, os.path.join(tmp, "opt.pt"), queue)
                proc = ctx.Process(target=_memory_probe, args=args)
                proc.start()
                try:
                    results[f"{n} {op}"] = {"params": n, "op": op, **queue.get(timeout=1800)}
                except Exception as err:
                    results[f"{n} {op}"] = {"params": n, "op": op, "error": repr(err)}
                proc.join()
    ray.shutdown()
    return results


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-params", default="50M,200M", help="sizes for the memory rows")
    parser.add_argument("--skip-timing", action="store_true", help="the memory rows only")
    args = parser.parse_args()
    sizes = [parse_size(x) for x in args.memory_params.split(",") if x.strip()]
    memory = memory_table(sizes)
    print("client peak RSS growth over one operation, AdamW, 2 shards (x: the state's bytes)")
    print(
        f"{'params':>12} {'operation':<28}{'state MB':>10}{'growth MB':>11}{'x state':>9}{'s':>7}"
    )
    for r in memory.values():
        if "error" in r:
            print(f"{r['params']:>12,} {r['op']:<28}  failed: {r['error']}")
            continue
        print(f"{r['params']:>12,} {r['op']:<28}{r['state_mb']:>10.0f}{r['growth_mb']:>11.0f}"
              f"{r['x_state']:>9.2f}{r['seconds']:>7.2f}")  # fmt: skip
    if args.skip_timing:
        write_results("state_dict_bench", {"args": vars(args), "memory": memory})
        return
    results = {}
    for name, run in (
        ("shardopt x2 (shared memory)", lambda: shardopt_run(args.params, args.repeats, True)),
        ("shardopt x2 (object store)", lambda: shardopt_run(args.params, args.repeats, False)),
        ("ZeRO x2 consolidate+state_dict", lambda: zero_anchor(args.params, args.repeats)),
    ):
        try:
            results[name] = run()
        except Exception as err:  # an anchor that cannot run here is recorded, not fatal
            results[name] = {"error": repr(err)}
    zero = results.get("ZeRO x2 consolidate+state_dict", {})
    zero_median = statistics.median(zero["seconds"]) if "seconds" in zero else None
    print(f"state_dict of AdamW over {args.params:,} float32 params, median of {args.repeats}")
    print(f"{'config':<34}{'ms':>9}{'GB/s':>8}{'x ZeRO':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<34}  failed: {r['error']}")
            continue
        med = statistics.median(r["seconds"])
        ratio = fixed(med / zero_median if zero_median else None, 8)
        print(f"{name:<34}{med * 1e3:>9.0f}{r['bytes'] / med / 1e9:>8.2f}{ratio}")
    write_results("state_dict_bench", {"args": vars(args), "memory": memory, **results})


if __name__ == "__main__":
    main()
