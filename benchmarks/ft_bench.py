"""Fault tolerance, timed: the cost of ``replicate=True`` per step, and recovery from a lost shard.

    python benchmarks/ft_bench.py [--sizes 10M,50M] [--repeats 10] [--trials 3] [--cluster]
    python benchmarks/ft_bench.py --quick        # ~1M parameters, a smoke run (< 90 s)

``shardopt.AdamW(lr=1e-3, num_shards=2)`` over N float32 parameters (four equal 1-D tensors;
every step gets the same fixed random gradients), on a local Ray
(``ray.init(address="local", num_cpus=4)``) or, with ``--cluster``, on a
``ray.cluster_utils.Cluster`` of three nodes, where the replicas live on other nodes than their
primaries. Two parts per size:

1. Steady state, ``replicate=False`` (off) against ``replicate=True`` (on), interleaved
   round-robin (the order rotates every round), median of ``--repeats`` steps after ``--warmup``:

   * optimizer step: ``opt.step()`` alone, back to back;
   * training step: a client-side forward/backward stand-in, then ``opt.step()``. The stand-in
     takes about as long as the off step (calibrated in the run): ``sleep`` leaves the client's
     CPUs idle (a model on a GPU), ``matmul`` keeps them busy (a model on these CPUs).

   A replica runs one step behind (the proxy collects its answer at the start of the next
   step), so in a training step its work can hide behind the next forward/backward. To time that
   steady state without one configuration's lag landing in another's sample, each replicated
   sample is one untimed step (which leaves the pipeline full), then the timed step (which waits
   for the previous step's replica, as every step of a training loop does), then an untimed wait
   for the replica. Overhead = on / off - 1.

2. Recovery, ``replicate=True``, ``--trials`` fresh optimizers per kind of failure: a few
   steps, then shard 0's primary is lost and the next ``opt.step()`` is timed from the failure
   to its return (the step committed on the promoted replica):

   * killed between steps: ``ray.kill(opt.backend.handles[0].host)`` just before the step;
   * dies in flight: ``shardopt.testing.inject_fault(..., "after_step")`` on the primary, whose
     process exits after
     applying the step and before answering; the failing step is timed alone.

   The failing step is compared with the normal steps before it; the table also shows what the
   recovery spent starting the new replica's host, the first step after (which waits for the new
   replica to be built from an export of the promoted shard), and the steps after that. Every
   trial's final parameters and optimizer state are compared (``torch.equal``) with those of an
   uninterrupted run of as many steps.

Prints a table and writes every sample to ``benchmarks/results/ft_bench.json``
(``ft_bench_cluster.json`` with ``--cluster``).
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

import shardopt
from shardopt.testing import inject_fault

# isort: split
# the benchmark's own module, next to this file
from common import (
    RESULTS,
    arg_parser,
    comma_list,
    describe,
    fixed,
    logger,
    parse_size,
    publish,
    rotate,
    run_meta,
    wait_for_quiet,
)

HYPERPARAMETERS = {"lr": 1e-3}
NUM_SHARDS = 2
FAILURES = {
    "kill": "killed between steps (ray.kill)",
    "in_flight": "dies in flight, after applying",
}
STAND_INS = ("sleep", "matmul")
log = logger("ft_bench")


# ----- the workload ---------------------------------------------------------------------------


def make_params(n: int, seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Four 1-D parameters of about ``n`` floats in all, and their fixed gradients."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [n // 4] * 3 + [n - 3 * (n // 4)]
    params = [torch.nn.Parameter(torch.empty(k).normal_(0.0, 0.02, generator=gen)) for k in sizes]
    grads = [torch.empty(k).normal_(0.0, 1e-3, generator=gen) for k in sizes]
    return params, grads


@dataclass
class Run:
    """One optimizer over its own copy of the parameters, stepped with the fixed gradients."""

    params: list[torch.nn.Parameter]
    grads: list[torch.Tensor]
    opt: shardopt.ShardedOptimizer
    steps: int = 0

    @classmethod
    def start(cls, n: int, replicate: bool) -> Run:
        params, grads = make_params(n)
        opt = shardopt.AdamW(params, num_shards=NUM_SHARDS, replicate=replicate, **HYPERPARAMETERS)
        return cls(params, grads, opt)

    def step(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g  # what backward would have left there
        self.opt.step()
        self.steps += 1

    def drain(self) -> None:
        """Waits for the replicas' lag (the previous step's answers); nothing without them."""
        if self.opt.backend.replicas is not None:
            self.opt.backend.replicas.settle()

    def facts(self) -> dict[str, Any]:
        opt = self.opt
        facts: dict[str, Any] = {
            "primary_nodes": list(opt.backend.host_nodes),
            "shared_memory": list(getattr(opt, "uses_shared_memory", []) or []),
            "shard_threads": list(opt.backend.threads),
        }
        if opt.backend.replicas is not None:
            facts["replica_nodes"] = list(opt.backend.replicas.nodes)
        return facts

    def close(self) -> None:
        self.opt.close()


class StandIn:
    """A forward/backward stand-in of about ``seconds``: a sleep, or that many matmuls.

    The matmuls are calibrated on the fastest of a few batches (noise only ever adds time).
    """

    def __init__(self, kind: str, seconds: float, dim: int = 512) -> None:
        self.kind, self.seconds, self.reps = kind, seconds, 0
        if kind == "matmul":
            self._a, self._b = torch.randn(dim, dim), torch.randn(dim, dim)
            self._c = torch.empty(dim, dim)
            batch, times = 8, []
            for _ in range(6):
                start = time.perf_counter()
                for _ in range(batch):
                    torch.mm(self._a, self._b, out=self._c)
                times.append((time.perf_counter() - start) / batch)
            self.reps = max(1, round(seconds / min(times[1:])))

    def describe(self) -> dict[str, Any]:
        return {"target_s": self.seconds, "matmuls": self.reps}

    def __call__(self) -> None:
        if self.kind == "sleep":
            time.sleep(self.seconds)
            return
        for _ in range(self.reps):
            torch.mm(self._a, self._b, out=self._c)


# ----- part 1: steady state -------------------------------------------------------------------


@dataclass
class Entry:
    """One timed configuration: an untimed step first, the timed step, an untimed wait after.

    Calling it does all three and returns the seconds of the timed step (a
    :data:`common.Measure`, for :func:`common.rotate`).
    """

    timed: Callable[[], object]
    prime: Callable[[], object] | None = None
    drain: Callable[[], object] | None = None

    def __call__(self) -> float:
        if self.prime is not None:
            self.prime()
        start = time.perf_counter()
        self.timed()
        elapsed = time.perf_counter() - start
        if self.drain is not None:
            self.drain()
        return elapsed


def training_step(run: Run, stand_in: StandIn) -> Callable[[], None]:
    def step() -> None:
        stand_in()
        run.step()

    return step


def steady_state(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 for one size: off and on, optimizer step and training steps, interleaved."""
    runs = {False: Run.start(n, replicate=False), True: Run.start(n, replicate=True)}
    try:
        # calibrate the stand-in on the off step (after a warm-up of both)
        for _ in range(args.warmup):
            for run in runs.values():
                run.step()
                run.drain()
        wait_for_quiet(timeout_s=args.settle)  # new replica hosts may still be starting up
        off_ms = []
        for _ in range(5):
            start = time.perf_counter()
            runs[False].step()
            off_ms.append((time.perf_counter() - start) * 1e3)
        target_s = statistics.median(off_ms) / 1e3
        stand_ins = {kind: StandIn(kind, target_s) for kind in args.stand_ins}
        entries: dict[str, Entry] = {}
        for kind, stand_in in stand_ins.items():
            entries[f"{kind}/alone"] = Entry(stand_in)
        for mode in ("step", *stand_ins):
            for replicate, run in runs.items():
                timed = run.step if mode == "step" else training_step(run, stand_ins[mode])
                entries[f"{mode}/{'on' if replicate else 'off'}"] = (
                    Entry(timed, prime=timed, drain=run.drain) if replicate else Entry(timed)
                )
        quiet = wait_for_quiet(timeout_s=args.settle)
        samples = rotate(entries, args.warmup, args.repeats)
        return {
            "calibration_off_step_ms": off_ms,
            "stand_ins": {k: v.describe() for k, v in stand_ins.items()},
            "quiet_before_timing": quiet,
            "samples": {name: s.to_json() for name, s in samples.items()},
            "facts": {"off": runs[False].facts(), "on": runs[True].facts()},
        }
    finally:
        for run in runs.values():
            run.close()
        del runs
        gc.collect()


# ----- part 2: recovery -----------------------------------------------------------------------


@dataclass
class Timer:
    """Wraps a method of one object (not its class) and keeps the seconds of each call."""

    seconds: list[float] = field(default_factory=list)

    def wrap(self, owner: Any, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        setattr(owner, name, timed)


def final_values(run: Run) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The run's parameters and optimizer state, as torch.equal compares them."""
    params = [p.detach().clone() for p in run.params]
    state = run.opt.state_dict()["state"]
    return params, state


def identical(a: tuple[list, dict], b: tuple[list, dict]) -> dict[str, bool]:
    (params_a, state_a), (params_b, state_b) = a, b
    same_params = len(params_a) == len(params_b) and all(
        torch.equal(x, y) for x, y in zip(params_a, params_b)
    )
    same_state = list(state_a) == list(state_b) and all(
        list(state_a[pid]) == list(state_b[pid])
        and all(torch.equal(v, state_b[pid][k]) for k, v in state_a[pid].items())
        for pid in state_a
    )
    return {"params": same_params, "state": same_state}


def recovery_trial(n: int, failure: str, args: argparse.Namespace) -> tuple[dict[str, Any], Run]:
    """One fresh replicated optimizer: normal steps, the failure, the failing step, steps after.

    Returns the record and the run (still open, for the comparison; the caller closes it).
    """
    run = Run.start(n, replicate=True)
    replicas = run.opt.backend.replicas
    recover, start_host = Timer(), Timer()
    for _ in range(args.warmup):
        run.step()
    run.drain()
    wait_for_quiet(timeout_s=min(args.settle, 5.0))
    normal = []
    for _ in range(args.normal_steps):
        start = time.perf_counter()
        run.step()
        normal.append(time.perf_counter() - start)
    recover.wrap(replicas, "recover")
    start_host.wrap(replicas, "_start_host")  # the new replica's host, started by the recovery
    victim = run.opt.backend.handles[0]
    if failure == "in_flight":
        inject_fault(victim, "after_step")
    start = time.perf_counter()
    if failure == "kill":
        ray.kill(victim.host)
    step_start = time.perf_counter()
    run.step()
    end = time.perf_counter()
    after = []
    for _ in range(args.after_steps):
        t0 = time.perf_counter()
        run.step()
        after.append(time.perf_counter() - t0)
    run.drain()
    record = {
        "failure": failure,
        "steps": run.steps,
        "normal_s": normal,
        "failing_s": end - start,
        "failing_step_only_s": end - step_start,
        "recover_s": recover.seconds,
        "new_replica_host_s": start_host.seconds,
        "after_s": after,
        "recoveries": replicas.recoveries,
        "facts": run.facts(),
    }
    return record, run


def recovery(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2 for one size: the reference run, then every failure's trials, each compared."""
    total = args.warmup + args.normal_steps + 1 + args.after_steps
    reference_run = Run.start(n, replicate=False)
    try:
        for _ in range(total):
            reference_run.step()
        reference = final_values(reference_run)
    finally:
        reference_run.close()
    trials: list[dict[str, Any]] = []
    for failure in args.failures:
        for _ in range(args.trials):
            run = None
            try:
                record, run = recovery_trial(n, failure, args)
                record["equal_to_uninterrupted"] = identical(final_values(run), reference)
            except Exception as exc:  # reported in the table; the other trials go on
                record = {"failure": failure, "error": describe(exc)}
            finally:
                if run is not None:
                    run.close()
                del run
                gc.collect()
            trials.append(record)
    del reference
    gc.collect()
    return {"uninterrupted_steps": total, "trials": trials}


# ----- the table ------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(seconds: float | None, width: int) -> str:
    return fixed(seconds * 1e3 if seconds is not None else None, width, 0)


STEADY_NOTES = [
    "on: each timed step first waits for the previous step's replica (lag 1), as in a training",
    "loop. The stand-ins are calibrated to the off step (their own median, timed alone in the",
    "same rounds, in brackets): sleep = client CPUs idle (a model on a GPU); matmul = client",
    "CPUs busy (a model on these CPUs, competing with the shards and the replicas).",
]
RECOVERY_NOTES = [
    "normal: the replicated steps just before the failure; x normal = failing / normal;",
    "new host: the part of the failing step spent starting the new replica's host actor;",
    "next: the first step after (waits for the new replica, built from an export of the",
    "promoted shard); after: the steps after that; equal: torch.equal of every parameter and",
    "optimizer-state tensor with an uninterrupted run (replicate=False) of as many steps.",
]


def format_table(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"shardopt.AdamW(lr=1e-3), {NUM_SHARDS} shards, float32; {meta['ray_setup']}; "
        f"{meta['cpus']} CPUs, torch {meta['torch']}, ray {meta['ray']}",
        "",
        f"1. steady state: median ms of {meta['repeats']} steps after {meta['warmup']} warm-up, "
        "off and on interleaved",
        f"{'size':<6}{'what is timed':<44}{'off ms':>9}{'on ms':>9}{'on/off':>8}"
        f"{'overhead':>10}{'on-off ms':>11}",
    ]
    for size, result in report["sizes"].items():
        steady = result.get("steady")
        if steady is None:
            lines.append(f"{size:<6}failed: {result.get('steady_error', '?')[:80]}")
            continue
        head = size
        for mode in ("step", *steady["stand_ins"]):
            if mode == "step":
                label = "optimizer step only: opt.step()"
            else:
                ms = steady["samples"][f"{mode}/alone"]["median_ms"]
                label = f"training step: {mode} stand-in ({fixed(ms, 0, 0)} ms) + step"
            off = steady["samples"][f"{mode}/off"]
            on = steady["samples"][f"{mode}/on"]
            error = off["error"] or on["error"]
            row = f"{head:<6}{label:<44}"
            head = ""
            if error:
                lines.append(row + f"failed: {error.splitlines()[-1][:70]}")
                continue
            ratio = on["median_ms"] / off["median_ms"]
            lines.append(
                row + f"{fixed(off['median_ms'], 9, 1)}{fixed(on['median_ms'], 9, 1)}"
                f"{ratio:>8.2f}{ratio - 1:>+10.0%}{on['median_ms'] - off['median_ms']:>11.1f}"
            )
    for size, result in report["sizes"].items():
        busy = result.get("steady", {}).get("quiet_before_timing", {}).get("cpu_busy", 0.0)
        if busy > 0.2:
            lines.append(f"{size}: CPUs {busy:.0%} busy when timing began (other work): noisy")
    lines += STEADY_NOTES
    lines += [
        "",
        "2. recovery (replicate=True): shard 0's primary lost, the next opt.step() timed from the",
        "   failure to its return; median over trials (a fresh optimizer each); ms",
        f"{'size':<6}{'failure':<33}{'n':>3}{'normal':>8}{'failing':>9}{'x normal':>9}"
        f"{'new host':>9}{'next':>7}{'after':>7}  equal to uninterrupted",
    ]
    for size, result in report["sizes"].items():
        rec = result.get("recovery")
        if rec is None:
            lines.append(f"{size:<6}failed: {result.get('recovery_error', '?')[:80]}")
            continue
        head = size
        for failure, label in FAILURES.items():
            trials = [t for t in rec["trials"] if t["failure"] == failure]
            if not trials:
                continue
            good = [t for t in trials if "error" not in t]
            row = f"{head:<6}{label:<33}{len(good):>3}"
            head = ""
            if not good:
                lines.append(row + f"  failed: {trials[0]['error'].splitlines()[-1][:60]}")
                continue
            normal = _median([_median(t["normal_s"]) for t in good])
            failing = _median([t["failing_s"] for t in good])
            host = _median([sum(t["new_replica_host_s"]) for t in good])
            nxt = _median([t["after_s"][0] for t in good if t["after_s"]])
            later = _median([_median(t["after_s"][1:]) for t in good if len(t["after_s"]) > 1])
            params = sum(t["equal_to_uninterrupted"]["params"] for t in good)
            state = sum(t["equal_to_uninterrupted"]["state"] for t in good)
            recovered = sum(t["recoveries"] == 1 for t in good)
            verdict = "yes" if params == state == recovered == len(trials) else "NO"
            lines.append(
                row + f"{_ms(normal, 8)}{_ms(failing, 9)}{failing / normal:>9.1f}"
                f"{_ms(host, 9)}{_ms(nxt, 7)}{_ms(later, 7)}  {verdict}: params {params}/"
                f"{len(trials)}, state {state}/{len(trials)}"
            )
            errors = [t for t in trials if "error" in t]
            if errors:
                lines.append(f"      {len(errors)} trial(s) failed: {errors[0]['error'][:80]}")
    lines += RECOVERY_NOTES
    return "\n".join(lines)


# ----- the run --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", default=None, help="parameter counts (default 10M,50M)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    parser.add_argument("--trials", type=int, default=None, help="per failure (default 3)")
    parser.add_argument("--normal-steps", type=int, default=3, help="timed before the failure")
    parser.add_argument("--after-steps", type=int, default=3, help="timed after the failure")
    parser.add_argument(
        "--stand-ins", default=",".join(STAND_INS), help="of: " + ",".join(STAND_INS)
    )
    parser.add_argument("--failures", default=",".join(FAILURES), help="of: " + ",".join(FAILURES))
    parser.add_argument("--cluster", action="store_true", help="a 3-node ray.cluster_utils.Cluster")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M, fewer steps")
    parser.add_argument(
        "--settle", type=float, default=None, help="most seconds to wait for idle CPUs (15)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ("1M" if args.quick else "10M,50M")
    args.repeats = args.repeats or (5 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.trials = args.trials or (1 if args.quick else 3)
    args.settle = args.settle if args.settle is not None else (3.0 if args.quick else 15.0)
    args.stand_ins = comma_list(parser, "--stand-ins", args.stand_ins, STAND_INS)
    args.failures = comma_list(parser, "--failures", args.failures, FAILURES)
    return args


def start_ray(cluster: bool, object_store_bytes: int) -> Any:
    """A local Ray, or a 3-node Cluster (returned, for shutdown)."""
    if not cluster:
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        return None
    from ray.cluster_utils import Cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "object_store_memory": object_store_bytes},
    )
    for _ in range(2):
        nodes.add_node(num_cpus=4, object_store_memory=object_store_bytes)
    ray.init(address=nodes.address)
    nodes.wait_for_nodes()
    return nodes


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    setup = (
        "ray.cluster_utils.Cluster of 3 nodes x 4 CPUs" if args.cluster else "local Ray, num_cpus=4"
    )
    report: dict[str, Any] = {
        "meta": {
            **run_meta(),
            "client_torch_threads": torch.get_num_threads(),
            "ray_setup": setup,
            "hyperparameters": HYPERPARAMETERS,
            "num_shards": NUM_SHARDS,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "trials": args.trials,
            "normal_steps": args.normal_steps,
            "after_steps": args.after_steps,
        },
        "sizes": {},
    }
    sizes = {s.strip(): parse_size(s) for s in args.sizes.split(",") if s.strip()}
    largest = max(sizes.values())
    log(f"starting Ray ({setup})")
    nodes = start_ray(args.cluster, max(512 * 2**20, 12 * 4 * largest))
    try:
        log("starting the shard hosts (not timed)")
        Run.start(1000, replicate=False).close()
        for size, n in sizes.items():
            result: dict[str, Any] = {"num_params": n}
            report["sizes"][size] = result
            log(f"{size}: steady state, replicate off and on, interleaved")
            try:
                result["steady"] = steady_state(n, args)
            except Exception as exc:
                result["steady_error"] = describe(exc)
            log(f"{size}: recovery trials")
            try:
                result["recovery"] = recovery(n, args)
            except Exception as exc:
                result["recovery_error"] = describe(exc)
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
    report["meta"]["seconds"] = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    name = "ft_bench_cluster" if args.cluster else "ft_bench"
    publish(name, report, format_table(report), args.out)


if __name__ == "__main__":
    main()
