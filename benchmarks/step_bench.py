"""One optimizer step, timed: shardopt against torch's optimizers and the memory-bandwidth floor.

    python benchmarks/step_bench.py [--sizes 10M,50M] [--layers 2] [--repeats 7] [--quick]
    python benchmarks/step_bench.py --sizes 2M --layers 160 --configs local,shardopt --ray-cpus 4

For each size N (float32 parameters shaped like a small transformer: an embedding, a few big
matrices, their vectors; ``--layers`` of them, 12 tensors each: a model of N parameters in many
tensors shows the per-tensor costs) and for AdamW and SGD(momentum=0.9), it times one step of

* torch foreach / torch fused / torch default: ``torch.optim`` in this process (``foreach=True``,
  ``fused=True``, and no choice, which on CPU is the for-loop that ZeRO's ranks and the RPC
  servers run; shardopt's shards run whatever shardopt picks);
* ZeRO 2 ranks: ``ZeroRedundancyOptimizer`` on 2 gloo processes on 127.0.0.1, the step with its
  parameter broadcast, ``parameters_as_bucket_view`` off and on (see ``anchors.py``);
* RPC DistOpt 2 PS: ``torch.distributed.optim.DistributedOptimizer``, trainer + 2 parameter
  servers, only ``opt.step(context_id)`` timed (see ``anchors.py``);
* shardopt 1 / 2 shards: the full step, from gradients on the user's parameters to updated
  values back in the user's tensors;
* the floor, measured in the same loop: ``a.add_(b)`` and ``dst.copy_(src)`` over N floats; the
  step floor is the step's bytes (AdamW 28 B/param, SGD 20 B/param) at ``add_``'s bandwidth, the
  shard-path floor adds one copy of the gradients in and one of the parameters out;
* the core floor, from torch fused and the copy each timed also on one thread (in the same loop):
  the least time the CPU work of a step that copies (the update, two copies of N floats) takes
  on this machine's cores, each piece at its fewest CPU-milliseconds, every core busy throughout
  (``step_report.core_floor``). A design that copies cannot beat it, however it overlaps.

The configurations in this process take turns round-robin in one loop (the order rotates every
round), after waiting for the CPUs to go quiet. ZeRO and RPC then run in their own processes, one
after the other, and time themselves the same way; the floor's kernels are timed again just before
and after each of those phases, so that drift between phases shows. Each figure is the median of
``--repeats`` steps after ``--warmup`` steps.

shardopt's configurations join the local Ray that ``--ray-cpus N`` starts with N logical CPUs
(by default shardopt starts one with the machine's CPUs): N above the machine's cores is what
the tests and some clusters give Ray; the shards' torch threads should then still fit the
cores (the second line above: about 2,000 tensors, where a thread too many costs the most).

Prints a table (medians, spread, ratios) and peak memory per process, and writes every sample to
``benchmarks/results/step_bench.json`` and a log-log plot to ``benchmarks/results/step_bench.png``
(``pip install -e '.[bench]'`` for matplotlib). See also ``train_step_bench.py`` (whole steps).
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import ray
import torch

import shardopt
from shardopt.actor.threads import usable_cpus
from shardopt.core import omp_threads

# isort: split
# the benchmark's own modules, next to this file
import anchors
from common import (
    RESULTS,
    Samples,
    arg_parser,
    comma_list,
    describe,
    logger,
    parse_size,
    peak_rss_bytes,
    processes_with,
    publish,
    reset_peak_rss,
    round_robin,
    run_meta,
    wait_for_quiet,
)
from step_report import (
    ADD,
    CLIENT,
    COPY,
    COPY_1T,
    CORE_FLOOR,
    FUSED,
    FUSED_1T,
    SHARD_FLOOR,
    STEP_FLOOR,
    add_ratios,
    floors,
    format_table,
    plot,
)
from workload import (
    ALGORITHMS,
    Algorithm,
    Shape,
    clone_params,
    count_params,
    make_params,
    transformer_shapes,
)

HOST_ENV = "SHARDOPT_STEP_BENCH_HOSTS"
"""Set on each shardopt configuration's shard hosts (its own pool) so their memory is theirs."""

LOCAL_VARIANTS: dict[str, dict[str, Any]] = {
    "torch foreach": {"foreach": True},
    "torch fused": {"fused": True},
    "torch default": {},
}
GROUPS = ("local", "zero", "rpc", "shardopt")
log = logger("step_bench")


def shardopt_name(num_shards: int, share_params: bool = False) -> str:
    name = f"shardopt {num_shards} shard" + ("s" if num_shards > 1 else "")
    return name + (", share_params" if share_params else "")


class InProcessResult(NamedTuple):
    """What one in-process cell measured."""

    records: dict[str, dict[str, Any]]
    """Per configuration: samples (or the error), facts such as shard host pids."""
    memory: dict[str, int | None]
    """Peak RSS of this process (all configurations alive at once) and of each shard host."""
    quiet: dict[str, float]
    """How long the cell waited for idle CPUs and how busy they were when timing began."""


@dataclass
class Config:
    """A configuration that steps in this process: its step, how to release it, facts about it."""

    step: Callable[[], object]
    close: Callable[[], None] = lambda: None
    facts: dict[str, Any] = field(default_factory=dict)


# ----- the configurations in this process -----------------------------------------------------


def local_config(
    params: list[torch.nn.Parameter], spec: Algorithm, variant: dict, single: bool = False
) -> Config:
    """``torch.optim.<Algorithm>`` over ``params`` (the local variants share one copy; each
    has its own state), stepping on one OpenMP thread where ``single``."""
    opt = spec.optimizer_class(params, **spec.hyperparameters, **variant)
    return Config(one_thread(opt.step) if single else opt.step, facts={"kwargs": variant})


def shardopt_config(
    base: list[torch.nn.Parameter], spec: Algorithm, num_shards: int, share_params: bool = False
) -> Config:
    """``shardopt.<Algorithm>(params, num_shards=k)``, its hosts labelled for the memory probe.

    ``share_params`` re-points the (cloned) parameters into the shards' shared buffers, so the
    step copies no parameters back.
    """
    label = f"shards={num_shards}"
    opt = getattr(shardopt, spec.optimizer_class.__name__)(
        clone_params(base),
        num_shards=num_shards,
        share_params=share_params,
        actor_options={"runtime_env": {"env_vars": {HOST_ENV: label}}},
        **spec.hyperparameters,
    )
    facts: dict[str, Any] = {"num_shards": num_shards, "host_pids": _host_pids(opt, label)}
    shared = getattr(opt, "uses_shared_memory", None)  # where the shared-memory path exists
    if shared is not None:
        facts["shared_memory"] = list(shared)
    return Config(opt.step, opt.close, facts)


def _host_pids(opt: shardopt.ShardedOptimizer, label: str) -> list[int]:
    """The optimizer's shard host processes: from the hosts' ``info()``, else from /proc."""
    try:
        infos = ray.get([h.info.remote() for h in getattr(opt, "_hosts", [])])
        pids = sorted({i["pid"] for i in infos if "pid" in i})
    except Exception:  # a host that cannot say
        pids = []
    return pids or _labelled_hosts(label)


def _labelled_hosts(label: str) -> list[int]:
    """Shard host processes of this label under this process (a local Ray started here)."""
    return processes_with("ray::ShardHost", f"{HOST_ENV}={label}", ancestor=os.getpid())


def kernel_medians(n: int, repeats: int = 3) -> dict[str, float | None]:
    """The floor's kernels alone, a few times: how fast the machine is right now."""
    samples = round_robin({k: c.step for k, c in kernel_configs(n).items()}, 1, repeats)
    return {k: s.median_ms for k, s in samples.items()}


def start_host_pools(shard_counts: tuple[int, ...]) -> None:
    """Starts Ray and each shardopt configuration's hosts now, so that no cell times their start."""
    shapes = transformer_shapes(100_000)
    for k in shard_counts:
        shardopt_config(make_params(shapes), ALGORITHMS["sgd"], k).close()


def kernel_configs(n: int) -> dict[str, Config]:
    """The floor's kernels: an in-place add and a copy over ``n`` floats, and the copy on one
    thread (as shardopt's client copies while the shards on its node step)."""
    a, b, dst = torch.rand(n), torch.rand(n), torch.empty(n)
    return {
        ADD: Config(lambda: a.add_(b)),
        COPY: Config(lambda: dst.copy_(b)),
        COPY_1T: Config(one_thread(lambda: dst.copy_(b))),
    }


def one_thread(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with this thread's torch ops on one OpenMP thread (as a shard host's update)."""

    def run() -> object:
        with omp_threads.at_most(1):
            return step()

    return run


def run_in_process(
    shapes: list[tuple[str, Shape]],
    algo: str,
    warmup: int,
    repeats: int,
    *,
    local: bool = True,
    shard_counts: tuple[int, ...] = (1, 2),
    settle_s: float = 15.0,
) -> InProcessResult:
    """Times the local, shardopt and floor configurations round-robin in one loop.

    Waits first (at most ``settle_s``) for the CPUs to go quiet: Ray's workers starting up, or
    other work on the machine, would otherwise land in the first rounds.
    """
    spec = ALGORITHMS[algo]
    for k in shard_counts:
        for pid in _labelled_hosts(f"shards={k}"):
            reset_peak_rss(pid)
    gc.collect()
    reset_peak_rss()
    base = make_params(shapes)
    # The local variants all update ``base`` in place (values do not matter to the timing; at
    # 50M floats that saves 0.8 GB); each shardopt configuration takes its own copy when it is
    # built, before any step, since shardopt re-sends parameters that something else changed.
    builders: list[tuple[str, Callable[[], Config]]] = [
        (name, partial(local_config, base, spec, variant))
        for name, variant in (LOCAL_VARIANTS.items() if local else ())
    ]
    if local:  # the shards' own work: torch's fused update on one thread (the core floor)
        builders.append((FUSED_1T, partial(local_config, base, spec, {"fused": True}, True)))
    builders += [(shardopt_name(k), partial(shardopt_config, base, spec, k)) for k in shard_counts]
    k = max(shard_counts, default=0)
    if k:
        builders.append((shardopt_name(k, True), partial(shardopt_config, base, spec, k, True)))
    configs: dict[str, Config] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, build in builders:
        try:
            configs[name] = build()
        except Exception as exc:  # reported in the table and the JSON; the others go on
            records[name] = Samples(error=describe(exc)).to_json()
    del base, builders
    configs.update(kernel_configs(count_params(shapes)))
    quiet = wait_for_quiet(timeout_s=settle_s)
    samples = round_robin({name: c.step for name, c in configs.items()}, warmup, repeats)
    memory = {CLIENT: peak_rss_bytes()}
    for name, config in configs.items():
        records[name] = {**samples[name].to_json(), "facts": config.facts}
        for pid in config.facts.get("host_pids", []):
            memory[f"{name}: shard host pid {pid}"] = peak_rss_bytes(pid)
    for config in configs.values():
        try:
            config.close()
        except Exception:  # a closed or broken optimizer: nothing more to release
            pass
    configs.clear()
    gc.collect()
    return InProcessResult(records, memory, quiet)


# ----- the run --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", default=None, help="parameter counts (default 10M,50M)")
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers: 12 tensors each (default 2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10M, 3 repeats")
    parser.add_argument("--algos", default="adamw,sgd", help="of: " + ",".join(ALGORITHMS))
    parser.add_argument("--configs", default=",".join(GROUPS), help="of: " + ",".join(GROUPS))
    parser.add_argument("--shards", default="1,2", help="shardopt shard counts (default 1,2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per ZeRO/RPC run, s")
    parser.add_argument(
        "--settle", type=float, default=15.0, help="most seconds to wait for idle CPUs per cell"
    )
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: the machine's; more, as tests and some "
        "clusters give Ray, shows how shardopt splits the real ones)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ("10M" if args.quick else "10M,50M")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.algos = comma_list(parser, "--algos", args.algos, ALGORITHMS)
    args.configs = comma_list(parser, "--configs", args.configs, GROUPS)
    args.shards = tuple(int(k) for k in args.shards.split(",") if k.strip())
    if "shardopt" not in args.configs:
        args.shards = ()
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every cell and anchor the arguments ask for; the report (records, cells, meta)."""
    started = time.perf_counter()
    report: dict[str, Any] = {
        "meta": {
            **run_meta(),
            "torch_threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "layers": args.layers,
            "ray_cpus": args.ray_cpus,
            "algorithms": {a: ALGORITHMS[a].hyperparameters for a in args.algos},
            "shapes": {},
        },
        "records": [],
        "cells": [],
        "phases": [],
    }
    if args.ray_cpus:  # shardopt joins it (else it starts one with the machine's CPUs)
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
    if args.shards:
        log("starting Ray and a pool of shard hosts per shardopt configuration")
        start_host_pools(args.shards)
    for size in args.sizes.split(","):
        shapes = transformer_shapes(parse_size(size), args.layers)
        n = count_params(shapes)
        report["meta"]["shapes"][size] = shapes
        per_algo: dict[str, dict[str, dict[str, Any]]] = {a: {} for a in args.algos}
        for algo in args.algos:
            log(f"{size} {algo}: in-process configurations and the floor, round-robin")
            t0 = time.perf_counter()
            result = run_in_process(
                shapes,
                algo,
                args.warmup,
                args.repeats,
                local="local" in args.configs,
                shard_counts=args.shards,
                settle_s=args.settle,
            )
            per_algo[algo].update(result.records)
            report["cells"].append(
                {
                    "size": size,
                    "algo": algo,
                    "num_params": n,
                    "seconds": time.perf_counter() - t0,
                    "quiet_before_timing": result.quiet,
                    "memory": result.memory,
                    "kernels": {k: result.records.get(k, {}).get("median_ms") for k in (ADD, COPY)},
                    "floors": floors(result.records, ALGORITHMS[algo], n, usable_cpus()),
                }
            )
        for group, runner in (("zero", anchors.run_zero), ("rpc", anchors.run_rpc)):
            if group in args.configs:
                log(f"{size}: {group} in child processes")
                before = kernel_medians(n)
                results, memory = runner(
                    shapes, args.algos, args.warmup, args.repeats, timeout_s=args.timeout
                )
                report["phases"].append(
                    {
                        "size": size,
                        "group": group,
                        "kernels_before": before,
                        "kernels_after": kernel_medians(n),
                    }
                )
                for algo, records in results.items():
                    for record in records.values():
                        record["own_processes"] = True
                    per_algo[algo].update(records)
                    _cell(report, size, algo)["memory"].update(memory.get(algo, {}))
        for algo in args.algos:
            f = _cell(report, size, algo)["floors"]
            per_algo[algo][STEP_FLOOR] = {"median_ms": f.get("step_floor_ms"), "derived": True}
            per_algo[algo][SHARD_FLOOR] = {"median_ms": f.get("shard_floor_ms"), "derived": True}
            if f.get("core_floor_ms"):
                per_algo[algo][CORE_FLOOR] = {"median_ms": f["core_floor_ms"], "derived": True}
            for config in _table_order(per_algo[algo], args.shards):
                report["records"].append(
                    {
                        "size": size,
                        "num_params": n,
                        "algo": algo,
                        "config": config,
                        **per_algo[algo][config],
                    }
                )
    add_ratios(report["records"])
    client = [c["memory"].get(CLIENT) for c in report["cells"]] + [peak_rss_bytes()]
    report["meta"]["client_peak_rss_bytes"] = max((m for m in client if m), default=None)
    report["meta"]["seconds"] = time.perf_counter() - started
    return report


def _cell(report: dict[str, Any], size: str, algo: str) -> dict[str, Any]:
    return next(c for c in report["cells"] if (c["size"], c["algo"]) == (size, algo))


def _table_order(records: dict[str, Any], shard_counts: tuple[int, ...]) -> list[str]:
    order = [*LOCAL_VARIANTS, *anchors.ZERO_CONFIGS.values(), anchors.RPC_CONFIG]
    order += [shardopt_name(k) for k in shard_counts]
    order += [shardopt_name(max(shard_counts), True)] if shard_counts else []
    order.insert(order.index(FUSED) + 1, FUSED_1T)
    order += [ADD, COPY, COPY_1T, STEP_FLOOR, SHARD_FLOOR, CORE_FLOOR]
    return [c for c in order if c in records] + [c for c in records if c not in order]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    own_ray = not ray.is_initialized()
    try:
        report = run(args)
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
    publish("step_bench", report, format_table(report), args.out)
    problem = plot(report, args.out / "step_bench.png")
    print(problem or f"plot: {args.out / 'step_bench.png'}")


if __name__ == "__main__":
    main()
