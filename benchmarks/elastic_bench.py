"""Elastic and replicated shard groups, timed: per-round overhead, and recovery from a loss.

    python benchmarks/elastic_bench.py [--size 1M] [--repeats 15] [--heartbeat 3] [--trials 2]

Three worker actors on a local Ray (``ray.init(address="local", num_cpus=4)``), each with
``shardopt.AdamW(lr=1e-3, num_shards=2, group=...)`` over ``--size`` float32 parameters (four
equal 1-D tensors; every step gets the same fixed random gradients, no model), in sync mode.

1. Per-round overhead: five groups alive at once, a plain sync group (``world_size=3``), the
   same through the object store (``shared_memory=False``: elastic and replicated groups
   always go that way, so this row separates the data path from their own cost), an
   elastic one (``elastic=True``) and two replicated ones (``replicate=True``: one replica
   per shard; ``replicate=2``: two); blocks of
   ``--block`` rounds on every worker, the group's order rotating each repeat; a round's time is
   rank 0's ``opt.step()``; median over the rounds after the warm-up. Overhead = x / plain - 1.
2. Recovery, ``--trials`` fresh groups per kind of loss, each training 3 workers; the time from
   the loss to the end of the first round completed without the lost worker (for a lost
   shard: of the first round started after the loss, which needs the failed-over shard; it
   includes one round's time), on rank 0's clock, next to the median round before the loss:

   * ``worker SIGKILL`` (elastic): a worker actor's process is killed; its actor's death drops
     it (the coordinator checks Ray's actor table every second);
   * ``worker SIGSTOP`` (elastic): a worker's process is stopped (alive, silent): only the
     missing heartbeats drop it, after ``--heartbeat`` seconds;
   * ``shard SIGKILL`` (replicated sync): the host of shard 1 is killed; the workers fail over
     to its replica and resend the round in flight.

Prints a table and writes every sample to ``benchmarks/results/elastic_bench.json``.

Talks to: Ray (a local instance, actors) and shardopt's groups.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import time
import uuid
from typing import Any

import ray
import torch

import shardopt
from shardopt.actor.host import NAMESPACE

# isort: split
# the benchmark's own module, next to this file
from common import arg_parser, fixed, logger, parse_size, publish, run_meta

log = logger("elastic_bench")
WORKERS = 3
KINDS = {
    "plain": {"world_size": WORKERS},
    "plain (store)": {"world_size": WORKERS, "shared_memory": False},
    "elastic": {"elastic": True},
    "replicated": {"world_size": WORKERS, "replicate": True},
    "replicated k=2": {"world_size": WORKERS, "replicate": 2},
}


class Worker:
    """One rank: fixed parameters and gradients, one optimizer per group it belongs to."""

    def __init__(self, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.randn(size // 4, generator=gen) for _ in range(4)]
        self.grads = [torch.randn(size // 4, generator=gen) for _ in range(4)]
        self.opts: dict[str, shardopt.ShardedOptimizer] = {}

    def attach(self, name: str, rank: int | None, options: dict[str, Any]) -> int:
        params = [torch.nn.Parameter(p.clone()) for p in self.params]
        opt = shardopt.AdamW(
            params, lr=1e-3, group=name, num_shards=2, rank=rank, timeout=300, **options
        )
        self.opts[name] = opt
        return opt.group.rank

    def run(self, name: str, steps: int) -> list[tuple[float, float, tuple[int, ...]]]:
        """``steps`` rounds; each round's start and end (``time.time()``) and participants."""
        opt = self.opts[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        times = []
        for _ in range(steps):
            start = time.time()
            for p, g in zip(params, self.grads):
                p.grad = g
            opt.step()
            times.append((start, time.time(), opt.group.participants))
        return times

    def pid(self) -> int:
        return os.getpid()

    def close(self, name: str) -> None:
        self.opts.pop(name).close()


def new_workers(size: int) -> list[Any]:
    remote = ray.remote(Worker).options(num_cpus=0)
    return [remote.remote(size) for _ in range(WORKERS)]


def attach(workers: list[Any], name: str, options: dict[str, Any]) -> None:
    for r, w in enumerate(workers):  # one after the other: ranks in order
        ray.get(w.attach.remote(name, None if options.get("elastic") else r, options))


def overhead(size: int, repeats: int, warmup: int, block: int) -> dict[str, Any]:
    workers = new_workers(size)
    names = {kind: f"eb-{re.sub('[^a-z0-9]', '', kind)}-{uuid.uuid4().hex[:6]}" for kind in KINDS}
    for kind, options in KINDS.items():
        attach(workers, names[kind], options)
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    kinds = list(KINDS)
    for r in range(warmup + repeats):
        shift = r % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            times = ray.get([w.run.remote(names[kind], block) for w in workers])[0]
            if r >= warmup:
                samples[kind] += [(end - start) * 1e3 for start, end, _ in times]
    for kind in KINDS:
        ray.get([w.close.remote(names[kind]) for w in workers])
        shardopt.close_group(names[kind])
    for w in workers:
        ray.kill(w)
    return {kind: {"ms": s, "median_ms": statistics.median(s)} for kind, s in samples.items()}


def recovery(size: int, kind: str, heartbeat: float) -> dict[str, Any]:
    """One trial: 3 workers train; after some rounds, the loss; timed on rank 0."""
    workers = new_workers(size)
    name = f"eb-rec-{uuid.uuid4().hex[:6]}"
    if kind.startswith("worker"):
        options = {"elastic": True, "heartbeat_timeout": heartbeat}
    else:
        options = {"world_size": WORKERS, "replicate": True}
    attach(workers, name, options)
    # the victim's pid first: a worker actor runs one call at a time (it would answer only
    # after its run), and the shard's host is the one the run starts on
    victim_pid = (
        ray.get(workers[2].pid.remote())
        if kind.startswith("worker")
        else ray.get(ray.get_actor(f"group/{name}/shard/1", namespace=NAMESPACE).info.remote())[
            "pid"
        ]
    )
    steps = 300
    runs = [w.run.remote(name, steps) for w in workers]
    if kind.startswith("worker"):  # the coordinator knows the rounds decided
        members = ray.get_actor(f"group/{name}/members", namespace=NAMESPACE)
        progress = lambda: ray.get(members.view.remote())["round"]  # noqa: E731
    else:
        shard0 = ray.get_actor(f"group/{name}/shard/0", namespace=NAMESPACE)
        progress = lambda: ray.get(shard0.version.remote())  # noqa: E731
    deadline = time.monotonic() + 3.0  # ten rounds in, or 3 s: the loss falls mid-run either way
    while progress() < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    lost_at = time.time()
    os.kill(victim_pid, signal.SIGSTOP if kind == "worker SIGSTOP" else signal.SIGKILL)
    survivors = workers[:2] if kind.startswith("worker") else workers
    times = ray.get(runs[0])
    ray.get(runs[1 : len(survivors)])
    if kind == "worker SIGSTOP":
        os.kill(victim_pid, signal.SIGKILL)
    before = [end - start for start, end, _ in times if end < lost_at]
    if kind.startswith("worker"):  # the first round without the lost worker
        after = [end for _, end, who in times if end > lost_at and 2 not in who]
    else:  # the first round started after the loss (it needs the failed-over shard)
        after = [end for start, end, _ in times if start > lost_at]
    for w in survivors:
        ray.get(w.close.remote(name))
    shardopt.close_group(name)
    for w in workers:
        ray.kill(w)
    return {
        "recovery_s": after[0] - lost_at if after else None,
        "round_ms": statistics.median(before) * 1e3 if before else None,
        "rounds_before": len(before),
        "rounds": [(start - lost_at, end - lost_at, list(who)) for start, end, who in times],
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"Elastic and replicated shard groups, {report['size']:,} parameters, 3 workers"]
    lines.append(f"load average at start: {report['meta'].get('loadavg')}")
    lines.append("")
    lines.append(f"{'round (rank 0)':<16}{'median ms':>12}{'vs plain':>12}")
    plain = report.get("overhead", {}).get("plain", {}).get("median_ms")
    for kind, row in report.get("overhead", {}).items():
        lines.append(
            f"{kind:<16}{fixed(row['median_ms'], 12)}"
            f"{fixed((row['median_ms'] / plain - 1) * 100, 11, 1)}%"
        )
    lines.append("")
    lines.append(f"{'loss':<18}{'to next round s':>17}{'round ms before':>17}")
    for kind, trials in report["recovery"].items():
        for t in trials:
            lines.append(f"{kind:<18}{fixed(t['recovery_s'], 17)}{fixed(t['round_ms'], 17)}")
    lines.append(f"(heartbeat_timeout {report['heartbeat']:g} s)")
    return "\n".join(lines)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--size", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    started = time.time()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[:3]
    report: dict[str, Any] = {"size": args.size, "heartbeat": args.heartbeat}
    if args.repeats:
        log("per-round overhead")
        report["overhead"] = overhead(args.size, args.repeats, args.warmup, args.block)
    report["recovery"] = {}
    for kind in ("worker SIGKILL", "worker SIGSTOP", "shard SIGKILL"):
        log(f"recovery: {kind}")
        report["recovery"][kind] = [
            recovery(args.size, kind, args.heartbeat) for _ in range(args.trials)
        ]
    report["meta"] = {**run_meta(), "seconds": time.time() - started, "loadavg": loadavg}
    publish("elastic_bench", report, format_table(report))
    ray.shutdown()


if __name__ == "__main__":
    main()
