"""Anchors that need processes of their own: torch's ZeroRedundancyOptimizer and RPC optimizer.

* ZeRO: ``torch.distributed.optim.ZeroRedundancyOptimizer`` on 2 gloo ranks; a step is the
  rank's update of its partition plus the broadcast that brings every parameter up to date, with
  ``parameters_as_bucket_view`` off and on (both optimizers live in the same ranks and take
  turns round-robin).
* RPC: ``torch.distributed.optim.DistributedOptimizer`` with a trainer and 2 parameter servers
  holding the parameters (as RRefs, placed largest first onto the least-loaded server). Each step
  gets a fresh ``dist_autograd`` context whose trivial loss (``sum(p**2) / 2`` on the servers)
  leaves gradients there; only ``opt.step(context_id)`` is timed. It supports only TorchScript
  functional optimizers, which use torch's for-loop kernels (no foreach, no fused).

The children are started with ``torch.multiprocessing`` (spawn) on 127.0.0.1 only, with a free
port, time their own steps with :func:`common.round_robin`, and write their numbers to a JSON
file per rank that the parent reads back. A failure (say, RPC init) comes back as an error record.

Talks to: torch.distributed (gloo, TensorPipe RPC) in the children; :mod:`workload` for what
they step, :mod:`common` for timing and memory probes.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pathlib
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

# isort: split
# the benchmark's own modules, next to this file
from common import (
    LOOPBACK,
    Samples,
    describe,
    free_port,
    peak_rss_bytes,
    reset_peak_rss,
    round_robin,
)
from workload import ALGORITHMS, Algorithm, Shape, clone_params, greedy_owners, make_params

ZERO_CONFIGS = {False: "ZeRO 2 ranks (gloo)", True: "ZeRO 2 ranks, bucket view"}
RPC_CONFIG = "RPC DistOpt 2 PS"

Records = dict[str, dict[str, dict[str, Any]]]
"""algorithm -> configuration -> its record (Samples.to_json() plus details)."""
Memory = dict[str, dict[str, int | None]]
"""algorithm -> process -> its peak RSS in bytes while that algorithm's configurations ran."""


def _child_setup(threads: int) -> None:
    """Loopback only for gloo and TensorPipe; this many torch threads."""
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    os.environ["MASTER_ADDR"] = LOOPBACK
    torch.set_num_threads(max(1, threads))


def _write(out_dir: str, rank: int, report: dict[str, Any]) -> None:
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def _spawn(fn: Callable[..., None], nprocs: int, args: tuple, timeout_s: float) -> list[dict]:
    """Runs ``fn(rank, nprocs, out_dir, *args)`` in ``nprocs`` spawned processes; their reports."""
    with tempfile.TemporaryDirectory(prefix="step_bench_") as out_dir:
        context = torch.multiprocessing.start_processes(
            fn, args=(nprocs, out_dir, *args), nprocs=nprocs, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.0, min(2.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn.__name__} ran past its {timeout_s:.0f} s limit")
        finally:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        return [
            json.loads(pathlib.Path(out_dir, f"rank{r}.json").read_text()) for r in range(nprocs)
        ]


def _failed(algos: list[str], configs: list[str], error: str) -> tuple[Records, Memory]:
    return {a: {c: Samples(error=error).to_json() for c in configs} for a in algos}, {}


# ----- ZeroRedundancyOptimizer ----------------------------------------------------------------


def run_zero(
    shapes: list[tuple[str, Shape]],
    algos: list[str],
    warmup: int,
    repeats: int,
    *,
    world_size: int = 2,
    timeout_s: float = 300.0,
) -> tuple[Records, Memory]:
    """Times ZeroRedundancyOptimizer steps (bucket view off and on) on ``world_size`` gloo ranks.

    Returns:
        Per algorithm and configuration, rank 0's samples (every rank's under ``"ranks"``); and
        per algorithm, each rank's peak RSS (both configurations live in the same ranks).
    """
    configs = list(ZERO_CONFIGS.values())
    threads = max(1, (os.cpu_count() or 1) // world_size)
    try:
        reports = _spawn(
            _zero_rank,
            world_size,
            (free_port(), shapes, algos, warmup, repeats, threads),
            timeout_s,
        )
    except Exception as exc:
        return _failed(algos, configs, describe(exc))
    out: Records = {}
    memory: Memory = {}
    for algo in algos:
        per_rank = [r["algos"].get(algo, {"error": "no report"}) for r in reports]
        out[algo] = {}
        for name in configs:
            records = [r.get("samples", {}).get(name, {"error": r.get("error")}) for r in per_rank]
            out[algo][name] = {
                **Samples().to_json(),
                **records[0],
                "ranks": records,
                "threads_per_rank": threads,
            }
        memory[algo] = {
            f"ZeRO rank {k} (both configs)": r.get("peak_rss_bytes") for k, r in enumerate(per_rank)
        }
    return out, memory


def _zero_steps(zero_class: type, shapes: list[tuple[str, Shape]], spec: Algorithm) -> dict:
    """One ZeroRedundancyOptimizer per configuration, over its own copy of the same params."""
    base = make_params(shapes)  # the same values on every rank
    return {
        name: zero_class(
            clone_params(base),
            optimizer_class=spec.optimizer_class,
            parameters_as_bucket_view=bucket,
            **spec.hyperparameters,
        ).step
        for bucket, name in ZERO_CONFIGS.items()
    }


def _zero_rank(
    rank: int,
    nprocs: int,
    out_dir: str,
    port: int,
    shapes: list[tuple[str, Shape]],
    algos: list[str],
    warmup: int,
    repeats: int,
    threads: int,
) -> None:
    _child_setup(threads)
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{LOOPBACK}:{port}",
        rank=rank,
        world_size=nprocs,
        timeout=timedelta(minutes=2),
    )
    report: dict[str, Any] = {"rank": rank, "algos": {}}
    try:
        for algo in algos:
            spec = ALGORITHMS[algo]
            reset_peak_rss()
            try:
                steps = _zero_steps(ZeroRedundancyOptimizer, shapes, spec)
                samples = round_robin(steps, warmup, repeats, before_each=dist.barrier)
                report["algos"][algo] = {
                    "samples": {name: s.to_json() for name, s in samples.items()},
                    "peak_rss_bytes": peak_rss_bytes(),
                }
            except Exception as exc:
                report["algos"][algo] = {"error": describe(exc), "peak_rss_bytes": peak_rss_bytes()}
            steps = {}
            gc.collect()
    finally:
        _write(out_dir, rank, report)
        dist.destroy_process_group()


# ----- RPC DistributedOptimizer ---------------------------------------------------------------


def run_rpc(
    shapes: list[tuple[str, Shape]],
    algos: list[str],
    warmup: int,
    repeats: int,
    *,
    servers: int = 2,
    timeout_s: float = 300.0,
) -> tuple[Records, Memory]:
    """Times ``DistributedOptimizer.step(context_id)`` with a trainer and ``servers`` PS.

    Returns:
        Per algorithm, the trainer's samples; and per algorithm, each process's peak RSS.
    """
    threads = max(1, (os.cpu_count() or 1) // servers)
    try:
        reports = _spawn(
            _rpc_rank,
            servers + 1,
            (free_port(), shapes, algos, warmup, repeats, threads),
            timeout_s,
        )
    except Exception as exc:
        return _failed(algos, [RPC_CONFIG], describe(exc))
    trainer = reports[0]["algos"]
    out: Records = {}
    memory: Memory = {}
    for algo in algos:
        record = {**Samples(error="no report").to_json(), **trainer.get(algo, {})}
        memory[algo] = record.pop("memory", {})
        out[algo] = {RPC_CONFIG: {**record, "threads_per_server": threads}}
    return out, memory


def _make_param(shape: Shape, seed: int) -> torch.Tensor:
    """A parameter created on a parameter server (owned there, held by the trainer as RRef)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, 0.02, generator=gen).requires_grad_()


def _half_square_sum(rrefs: list[Any]) -> torch.Tensor:
    """The server's part of the trivial loss; its gradient is the parameter itself."""
    return sum(0.5 * (r.local_value() ** 2).sum() for r in rrefs)


def _rpc_rank(
    rank: int,
    nprocs: int,
    out_dir: str,
    port: int,
    shapes: list[tuple[str, Shape]],
    algos: list[str],
    warmup: int,
    repeats: int,
    threads: int,
) -> None:
    _child_setup(threads)
    from torch.distributed import rpc

    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{LOOPBACK}:{port}", rpc_timeout=300
    )
    rpc.init_rpc(f"rank{rank}", rank=rank, world_size=nprocs, rpc_backend_options=options)
    report: dict[str, Any] = {"rank": rank, "algos": {}}
    try:
        if rank == 0:
            servers = [f"rank{k}" for k in range(1, nprocs)]
            report["algos"] = {
                algo: _rpc_train(shapes, algo, warmup, repeats, servers) for algo in algos
            }
    finally:
        _write(out_dir, rank, report)
        rpc.shutdown()


def _rpc_train(
    shapes: list[tuple[str, Shape]], algo: str, warmup: int, repeats: int, servers: list[str]
) -> dict[str, Any]:
    """One algorithm's RPC record: samples or error, peak memory, the warnings torch gave."""
    samples = Samples()
    memory: dict[str, int | None] = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            memory = _rpc_time_steps(shapes, ALGORITHMS[algo], warmup, repeats, servers, samples)
        except Exception as exc:
            samples.error = describe(exc)
    gc.collect()
    notes = sorted({f"{w.category.__name__}: {w.message}" for w in seen})
    return {**samples.to_json(), "memory": memory, "warnings": notes}


def _rpc_time_steps(
    shapes: list[tuple[str, Shape]],
    spec: Algorithm,
    warmup: int,
    repeats: int,
    servers: list[str],
    samples: Samples,
) -> dict[str, int | None]:
    """Places the parameters on the servers, times the steps into ``samples``; peak memory."""
    from torch.distributed import autograd as dist_autograd
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    for server in servers:
        rpc.rpc_sync(server, reset_peak_rss)
    reset_peak_rss()
    owners = greedy_owners([math.prod(s) for _, s in shapes], len(servers))
    rrefs = [
        rpc.remote(servers[o], _make_param, args=(shape, i))
        for i, ((_, shape), o) in enumerate(zip(shapes, owners))
    ]
    by_server = [[r for r, o in zip(rrefs, owners) if o == k] for k in range(len(servers))]
    opt = DistributedOptimizer(spec.optimizer_class, rrefs, **spec.hyperparameters)
    for r in range(warmup + repeats):
        gc.collect()
        with dist_autograd.context() as context_id:
            losses = [
                rpc.rpc_sync(server, _half_square_sum, args=(refs,))
                for server, refs in zip(servers, by_server)
                if refs
            ]
            dist_autograd.backward(context_id, [torch.stack(losses).sum()])
            start = time.perf_counter()
            opt.step(context_id)
            samples.add((time.perf_counter() - start) * 1e3, warmup=r < warmup)
    memory = {"RPC trainer": peak_rss_bytes()}
    memory.update({f"RPC PS {s}": rpc.rpc_sync(s, peak_rss_bytes) for s in servers})
    return memory
