"""Data-parallel training on one node and on a simulated multi-node cluster: shardopt groups
against DDP.

    python benchmarks/group_bench.py [--shapes node,cluster] [--workers 1,2,4] [--quick]
    python benchmarks/group_bench.py --shapes node --workers 2,4 --straggler-ms 40

The default run (4.2M parameters, 1/2/4 workers, both shapes) takes about 8 minutes on a
2-core machine; ``--quick`` (a tiny MLP) is mostly starting the clusters, actors and shards.

Each shape starts a ``ray.cluster_utils.Cluster`` on this machine: ``cluster`` is a head and
``--nodes - 1`` worker nodes (``--node-cpus`` logical CPUs and ``--object-store-mb`` of object
store each), ``node`` one node with as many logical CPUs as the whole ``cluster`` shape. For
each world size N, N worker actors are spread over its nodes (``scheduling_strategy="SPREAD"``;
with ``--worker-pg``, one bundle each of a ``SPREAD`` placement group instead, as Ray Train
places its workers: a group without ``--placement`` then spreads its shards over those nodes).
The same actors train, one configuration after the other, an MLP (``--layers`` linear layers
of ``--width``, ReLU between) on a fixed batch of their own (MSE loss, AdamW lr 1e-3) with

* DDP: ``DistributedDataParallel`` over gloo (a ``tcp://127.0.0.1`` rendezvous on a free port)
  and a local ``torch.optim.AdamW(fused=True)`` in every worker, the anchor;
* shardopt sync: ``shardopt.AdamW(..., group=..., world_size=N, rank=r, mode="sync",
  num_shards=2)``: each step averages every worker's gradients on the group's shards;
* shardopt async: the same with ``mode="async"``: each push is applied as it arrives;
* plain (1 worker only): a plain ``shardopt.AdamW(..., num_shards=2)`` without a group, the
  anchor of a 1-worker group (``vs plain``: the group's step time over the plain one's).

A step is ``zero_grad``, forward, backward, ``step`` (DDP's all-reduce runs inside backward).
With ``--straggler-ms MS``, rank 0 is a slower worker: it sleeps MS after each backward, in every
configuration (a slower device or link: the sleep takes no CPU from the others). That is the
shape async mode is for: a sync round, like DDP's all-reduce, waits for the slowest worker, an
async push waits for nobody. The results then go to ``group_bench_straggler.json``, and the
figure to compare is ``total samples/s``: every worker's samples over its own wall time, summed
(the median step time says little when one worker is slower than the rest).

Each configuration runs ``--warmup`` steps, then ``--steps`` timed ones on every worker at once;
the figure is the median step time over all workers' timed steps. With ``--blocks B`` each
configuration runs B times, their order rotating from block to block so that the machine's
drifting load hits each of them alike: the median is over every block's steps, the total
samples/s the median of the blocks'. After the timed steps the benchmark checks that every
worker holds the very same parameters (``torch.equal``) in DDP and in sync mode, and how far
sync mode's parameters are from DDP's (same initial weights, data and steps; DDP runs first).
With 1 or 2 workers they are equal; beyond, gloo's all-reduce and the shards add the gradients
in different orders, and AdamW's normalisation makes those rounding differences visible (about
1e-3 after 35 steps at lr 1e-3; in-process, adding the same 4 gradients as ``g0+g1+g2+g3`` or
``(g0+g1)+(g2+g3)`` differs as much).

Prints a table per shape (ms/step, steps/s per worker, samples/s over all workers, ratio to DDP
at the same world size, and what the timed steps cost the machine: the share of its CPUs busy
and the CPU-milliseconds per sample, every process counted, from ``/proc/stat``; when the CPUs
are all busy, the configuration with fewer CPU-ms per sample trains faster) and writes every
sample to ``benchmarks/results/group_bench.json``. All the "nodes" share this machine's cores:
the figures measure the data path (object store, gloo on loopback, the shards' averaging), not a
real network. A group worker pushes to a shard on
another node over a network lane (TCP, the data inline; each record's ``lanes`` gives every
worker's open lanes and how many are network lanes), and so does the plain optimizer to its
shards on other nodes (each ``plain`` record's ``transports``: ``network_lane``,
``shared_memory`` or ``object_store`` per shard); ``SHARDOPT_NET_LANES=0`` in the environment
sends both through Ray's object store instead (``meta.net_lanes``), to compare.

Talks to: Ray (a local ``Cluster``, actors), torch.distributed (gloo) and shardopt's groups.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import nn

import shardopt

# isort: split
# the benchmark's own module, next to this file
from common import (
    LOOPBACK,
    RESULTS,
    MachineCpu,
    arg_parser,
    comma_list,
    describe,
    free_port,
    logger,
    publish,
    run_meta,
)

MODES = ("ddp", "sync", "async", "plain")
LABELS = {
    "ddp": "DDP + AdamW(fused)",
    "sync": "shardopt sync",
    "async": "shardopt async",
    "plain": "plain ShardedOptimizer",
}
SHAPES = ("node", "cluster")
log = logger("group_bench")


@dataclass(frozen=True)
class Workload:
    """What every configuration trains: the MLP, each worker's batch, the optimizer's lr."""

    width: int
    layers: int
    batch: int
    lr: float = 1e-3
    seed: int = 0


def make_model(workload: Workload) -> nn.Module:
    """The MLP, with the same initial weights in every worker."""
    torch.manual_seed(workload.seed)
    layers: list[nn.Module] = []
    for i in range(workload.layers):
        layers.append(nn.Linear(workload.width, workload.width))
        if i < workload.layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def count_params(workload: Workload) -> int:
    return workload.layers * (workload.width * workload.width + workload.width)


class BenchWorker:
    """One rank: its fixed batch, one configuration at a time, its steps timed here.

    A plain class; the benchmark makes it a Ray actor (one CPU, spread over the nodes).
    """

    def __init__(self, rank: int, workload: Workload, threads: int, delay_ms: float = 0) -> None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every "node" is this machine
        torch.set_num_threads(threads)
        self.rank = rank
        self.workload = workload
        self.delay_s = delay_ms / 1e3
        gen = torch.Generator().manual_seed(1000 + rank)
        self.x = torch.randn(workload.batch, workload.width, generator=gen)
        self.y = torch.randn(workload.batch, workload.width, generator=gen)
        self.mode: str | None = None
        self.model: nn.Module | None = None
        self.trained: nn.Module | None = None  # the module the loss runs through (DDP's wrapper)
        self.opt: torch.optim.Optimizer | None = None
        self.ddp_params: list[torch.Tensor] | None = None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        """A free port on this worker's node, for DDP's rendezvous."""
        return free_port()

    def setup_ddp(self, port: int, world_size: int) -> None:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{LOOPBACK}:{port}",
            rank=self.rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=2),
        )
        self.mode = "ddp"
        self.model = make_model(self.workload)
        self.trained = nn.parallel.DistributedDataParallel(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.workload.lr, fused=True)

    def setup_shardopt(
        self, group: str, world_size: int, mode: str, num_shards: int, placement: str | None
    ) -> list[str]:
        """Attaches to (or creates) the group; returns the nodes of its shards."""
        self.mode = mode
        self.model = self.trained = make_model(self.workload)
        self.opt = shardopt.AdamW(
            self.model.parameters(),
            lr=self.workload.lr,
            group=group,
            world_size=world_size,
            rank=self.rank,
            mode=mode,
            num_shards=num_shards,
            placement=placement,
            timeout=120,
        )
        return list(self.opt.group.membership.node_ids)

    def lanes(self) -> tuple[int, int]:
        """(open push lanes, of which network lanes to shards on other nodes)."""
        lanes = self.opt.group.lanes
        return len(lanes), lanes.net

    def setup_plain(self, num_shards: int) -> list[str]:
        """A plain sharded optimizer (no group), with the group's number of shards; returns
        how each shard is reached (``shard_status()``'s transports)."""
        self.mode = "plain"
        self.model = self.trained = make_model(self.workload)
        self.opt = shardopt.AdamW(
            self.model.parameters(), lr=self.workload.lr, num_shards=num_shards
        )
        return [st.transport for st in self.opt.shard_status()]

    def run(self, steps: int) -> dict[str, Any]:
        """``steps`` training steps; their times (ms), the wall time, async staleness."""
        times, staleness = [], []
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(self.trained(self.x), self.y)
            loss.backward()
            if self.delay_s:
                time.sleep(self.delay_s)
            self.opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
            if self.mode not in ("ddp", "plain"):
                staleness += [r.staleness for r in self.opt.group.last_push]
        return {
            "samples_ms": times,
            "wall_s": time.perf_counter() - start,
            "staleness": staleness,
            "loss": loss.item(),
        }

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def equal_to(self, params: list[torch.Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.model.parameters(), params))

    def max_diff_to_ddp(self) -> float | None:
        """Largest |difference| between these parameters and the last DDP run's."""
        if self.ddp_params is None:
            return None
        return max(
            (a.detach() - b).abs().max().item()
            for a, b in zip(self.model.parameters(), self.ddp_params)
        )

    def teardown(self) -> None:
        if self.mode == "ddp":
            import torch.distributed as dist

            self.ddp_params = self.params()
            dist.destroy_process_group()
        elif self.opt is not None:
            self.opt.close()
        self.mode = self.model = self.trained = self.opt = None


# ----- the run --------------------------------------------------------------------------------


def start_cluster(nodes: int, cpus: int, store_mb: int) -> Cluster:
    """A head and ``nodes - 1`` worker nodes on this machine; this process joins it."""
    node_args = {"num_cpus": cpus, "object_store_memory": store_mb * 2**20}
    cluster = Cluster(
        initialize_head=True, head_node_args={**node_args, "include_dashboard": False}
    )
    for _ in range(nodes - 1):
        cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def run_config(workers: list[Any], mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration on ``workers``: set up, warm up, time, check, tear down."""
    n = len(workers)
    record: dict[str, Any] = {"mode": mode, "workers": n}
    group = None
    try:
        if mode == "ddp":
            port = ray.get(workers[0].free_port.remote())
            ray.get([w.setup_ddp.remote(port, n) for w in workers])
        elif mode == "plain":
            record["transports"] = ray.get(workers[0].setup_plain.remote(args.shards))
        else:
            group = f"group-bench-{uuid.uuid4().hex[:8]}-{mode}-{n}"
            record["group"] = group
            setups = [
                w.setup_shardopt.remote(group, n, mode, args.shards, args.placement)
                for w in workers
            ]
            record["shard_nodes"] = ray.get(setups)[0]
            record["lanes"] = ray.get([w.lanes.remote() for w in workers])
        ray.get([w.run.remote(args.warmup) for w in workers])
        with MachineCpu() as cpu:
            runs = ray.get([w.run.remote(args.steps) for w in workers])
        samples = [ms for r in runs for ms in r["samples_ms"]]
        median = statistics.median(samples)
        record.update(
            median_ms=median,
            steps_per_s=1e3 / median,
            samples_per_s=n * args.batch * 1e3 / median,
            wall_steps_per_s=[args.steps / r["wall_s"] for r in runs],
            total_samples_per_s=sum(args.steps * args.batch / r["wall_s"] for r in runs),
            samples_ms=[r["samples_ms"] for r in runs],
            last_loss=[r["loss"] for r in runs],
            cpu_busy=cpu.busy_fraction,
            cpu_ms_per_sample=(
                cpu.busy_s * 1e3 / (n * args.steps * args.batch) if cpu.busy_s else None
            ),
        )
        if mode == "async":
            stale = [s for r in runs for s in r["staleness"] if s is not None]
            record["mean_staleness"] = statistics.fmean(stale) if stale else None
        if mode in ("ddp", "sync"):
            reference = workers[0].params.remote()
            record["params_equal"] = all(ray.get([w.equal_to.remote(reference) for w in workers]))
        if mode == "sync":
            record["max_abs_diff_to_ddp"] = ray.get(workers[0].max_diff_to_ddp.remote())
    finally:
        ray.get([w.teardown.remote() for w in workers])
        if group is not None:
            shardopt.close_group(group)
    return record


def merge_blocks(blocks: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's record over its blocks: the median step time over every block's
    samples, the median of the blocks' total samples/s, each block's figures kept in
    ``blocks``; an error in any block is the record's error."""
    failed = next((b for b in blocks if b.get("error")), None)
    if failed is not None or len(blocks) == 1:
        return failed or blocks[0]
    n = blocks[0]["workers"]
    samples = [ms for b in blocks for worker in b["samples_ms"] for ms in worker]
    median = statistics.median(samples)
    record = {
        **blocks[-1],
        "median_ms": median,
        "steps_per_s": 1e3 / median,
        "samples_per_s": n * args.batch * 1e3 / median,
        "total_samples_per_s": statistics.median(b["total_samples_per_s"] for b in blocks),
        **{
            key: statistics.median(b[key] for b in blocks)
            if all(b.get(key) for b in blocks)
            else None
            for key in ("cpu_busy", "cpu_ms_per_sample")
        },
        "samples_ms": [sum((b["samples_ms"][r] for b in blocks), []) for r in range(n)],
        "blocks": [
            {
                key: b.get(key)
                for key in ("median_ms", "total_samples_per_s", "cpu_busy", "cpu_ms_per_sample")
            }
            for b in blocks
        ],
    }
    if "params_equal" in blocks[0]:
        record["params_equal"] = all(b["params_equal"] for b in blocks)
    return record


def shape_nodes(shape: str, args: argparse.Namespace) -> tuple[int, int]:
    """(nodes, logical CPUs per node) of a shape: one node has the whole cluster's CPUs."""
    if shape == "node":
        return 1, args.nodes * args.node_cpus
    return args.nodes, args.node_cpus


def worker_strategy(pg: PlacementGroup | None, rank: int) -> Any:
    """Where worker ``rank`` goes: its bundle of ``pg``, else anywhere (Ray's ``SPREAD``)."""
    if pg is None:
        return "SPREAD"
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)


def run_shape(shape: str, workload: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every world size and mode on one shape's cluster (started here and shut down)."""
    nodes, cpus = shape_nodes(shape, args)
    log(f"{shape}: starting a {nodes}-node cluster ({cpus} logical CPUs per node)")
    cluster = start_cluster(nodes, cpus, args.object_store_mb)
    records = []
    try:
        for n in args.workers:
            log(f"{shape}, {n} worker(s): starting the actors")
            pg = placement_group([{"CPU": 1}] * n, strategy="SPREAD") if args.worker_pg else None
            workers = [
                ray.remote(BenchWorker)
                .options(num_cpus=1, scheduling_strategy=worker_strategy(pg, r))
                .remote(r, workload, args.threads, args.straggler_ms if r == 0 else 0)
                for r in range(n)
            ]
            worker_nodes = ray.get([w.node_id.remote() for w in workers])
            modes = [m for m in args.modes if m != "plain" or n == 1]
            blocks: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for b in range(args.blocks):  # the order rotates: drifting load hits every mode
                for mode in modes[b % len(modes) :] + modes[: b % len(modes)]:
                    log(f"{shape}, {n} worker(s): {mode} (block {b + 1} of {args.blocks})")
                    try:
                        blocks[mode].append(run_config(workers, mode, args))
                    except Exception as exc:  # reported in the table and JSON; the others go on
                        blocks[mode].append({"mode": mode, "workers": n, "error": describe(exc)})
                        log(f"{n} worker(s): {mode} failed: {blocks[mode][-1]['error'][:500]}")
            for mode in modes:
                record = merge_blocks(blocks[mode], args)
                record["shape"] = shape
                record["worker_nodes"] = worker_nodes
                records.append(record)
            for w in workers:
                ray.kill(w)
            if pg is not None:
                remove_placement_group(pg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    add_ratios(records)
    return records


def run(args: argparse.Namespace) -> dict[str, Any]:
    workload = Workload(args.width, args.layers, args.batch)
    report: dict[str, Any] = {
        "meta": {
            **run_meta(),
            "shapes": {
                shape: dict(zip(("nodes", "cpus_per_node"), shape_nodes(shape, args)))
                for shape in args.shapes
            },
            "object_store_mb": args.object_store_mb,
            "workload": asdict(workload),
            "num_params": count_params(workload),
            "threads_per_worker": args.threads,
            "num_shards": args.shards,
            "placement": args.placement,
            "worker_pg": args.worker_pg,
            "warmup": args.warmup,
            "steps": args.steps,
            "blocks": args.blocks,
            "straggler_ms": args.straggler_ms,
            "loadavg_before": load_average(),
            "net_lanes": os.environ.get("SHARDOPT_NET_LANES", "1") != "0",
        },
        "records": [],
    }
    started = time.perf_counter()
    for shape in args.shapes:
        report["records"] += run_shape(shape, workload, args)
    report["meta"]["loadavg_after"] = load_average()
    report["meta"]["seconds"] = time.perf_counter() - started
    return report


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other work shares these cores)."""
    try:
        return [float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each record's steps/s over DDP's at the same world size (above 1: faster than DDP), the
    same for the total samples/s over all workers' wall time (``total vs DDP``), and a 1-worker
    group's step time over the plain optimizer's (``vs plain``: below 1.2 is the goal)."""
    ddp = {r["workers"]: r.get("steps_per_s") for r in records if r["mode"] == "ddp"}
    ddp_total = {r["workers"]: r.get("total_samples_per_s") for r in records if r["mode"] == "ddp"}
    plain = next((r.get("median_ms") for r in records if r["mode"] == "plain"), None)
    for r in records:
        anchor, ours = ddp.get(r["workers"]), r.get("steps_per_s")
        r["ratio_vs_ddp"] = ours / anchor if anchor and ours else None
        anchor, ours = ddp_total.get(r["workers"]), r.get("total_samples_per_s")
        r["total_ratio_vs_ddp"] = ours / anchor if anchor and ours else None
        if r["workers"] == 1 and r["mode"] in ("sync", "async") and plain and r.get("median_ms"):
            r["time_vs_plain"] = r["median_ms"] / plain


def format_table(report: dict[str, Any]) -> str:
    meta = report["meta"]
    w = meta["workload"]
    shapes = ", ".join(
        f"{shape}: {v['nodes']} node(s) x {v['cpus_per_node']} CPUs"
        for shape, v in meta["shapes"].items()
    )
    lines = [
        f"MLP {w['layers']}x{w['width']} ({meta['num_params'] / 1e6:.2f}M params), batch "
        f"{w['batch']} per worker; {shapes}; a {meta['cpus']}-core machine (load average "
        f"{meta['loadavg_before']} before, {meta['loadavg_after']} after); median of "
        f"{meta['steps']} steps after {meta['warmup']}"
        + (f", in each of {meta['blocks']} rotating blocks" if meta.get("blocks", 1) > 1 else "")
        + f"; shardopt num_shards={meta['num_shards']}, "
        f"placement={meta['placement']}"
        + ("; workers in a SPREAD placement group" if meta.get("worker_pg") else "")
        + (f"; rank 0 sleeps {meta['straggler_ms']:g} ms a step" if meta["straggler_ms"] else ""),
        f"{'shape':<9}{'config':<24}{'workers':>8}{'ms/step':>10}{'steps/s':>9}{'samples/s':>11}"
        f"{'vs DDP':>8}{'total samples/s':>17}{'total vs DDP':>14}{'vs plain':>9}"
        f"{'CPUs busy':>10}{'CPU ms/sample':>14}  same params on all workers",
    ]
    for r in report["records"]:
        head = f"{r['shape']:<9}{LABELS[r['mode']]:<24}{r['workers']:>8}"
        if r.get("error"):
            lines.append(f"{head}  error: {r['error'][:200]}")
            continue
        ratio = f"{r['ratio_vs_ddp']:.2f}" if r.get("ratio_vs_ddp") else "-"
        vs_plain = f"{r['time_vs_plain']:.2f}" if r.get("time_vs_plain") else "-"
        total = f"{r['total_ratio_vs_ddp']:.2f}" if r.get("total_ratio_vs_ddp") else "-"
        busy = f"{r['cpu_busy']:.0%}" if r.get("cpu_busy") else "-"
        per_sample = f"{r['cpu_ms_per_sample']:.3f}" if r.get("cpu_ms_per_sample") else "-"
        if "params_equal" in r:
            check = "yes" if r["params_equal"] else "NO"
        elif r["mode"] == "plain":
            check = "n/a"
        else:
            stale = r.get("mean_staleness")
            check = "n/a" + (f" (mean staleness {stale:.2f})" if stale is not None else "")
        if r.get("max_abs_diff_to_ddp") is not None:
            check += f"; max |sync - DDP| {r['max_abs_diff_to_ddp']:.1e}"
        lines.append(
            f"{head}{r['median_ms']:>10.1f}{r['steps_per_s']:>9.2f}{r['samples_per_s']:>11.0f}"
            f"{ratio:>8}{r['total_samples_per_s']:>17.0f}{total:>14}{vs_plain:>9}"
            f"{busy:>10}{per_sample:>14}  {check}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="of: " + ",".join(SHAPES))
    parser.add_argument("--workers", default="1,2,4", help="world sizes (default 1,2,4)")
    parser.add_argument("--modes", default=",".join(MODES), help="of: " + ",".join(MODES))
    parser.add_argument("--width", type=int, default=None, help="MLP width (default 1024)")
    parser.add_argument("--layers", type=int, default=None, help="linear layers (default 4)")
    parser.add_argument("--batch", type=int, default=None, help="per worker (default 64)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30)")
    parser.add_argument("--shards", type=int, default=2, help="shardopt num_shards (default 2)")
    parser.add_argument(
        "--placement", default=None, help="shardopt placement, e.g. SPREAD (default: none)"
    )
    parser.add_argument(
        "--worker-pg", action="store_true",
        help="workers in a SPREAD placement group, a bundle each (as Ray Train places them)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--nodes", type=int, default=3, help="nodes, head included (default 3)")
    parser.add_argument("--node-cpus", type=int, default=2, help="logical CPUs per node")
    parser.add_argument("--object-store-mb", type=int, default=200, help="per node")
    parser.add_argument(
        "--blocks", type=int, default=1,
        help="runs of each configuration, their order rotating (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--straggler-ms", type=float, default=0, help="rank 0 sleeps this long after backward"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny MLP, few steps")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    quick = {"width": 64, "layers": 2, "batch": 16, "warmup": 2, "steps": 5}
    full = {"width": 1024, "layers": 4, "batch": 64, "warmup": 5, "steps": 30}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workers = [int(n) for n in args.workers.split(",") if n.strip()]
    args.modes = comma_list(parser, "--modes", args.modes, MODES)
    args.shapes = comma_list(parser, "--shapes", args.shapes, SHAPES)
    if any(n > args.nodes * args.node_cpus for n in args.workers):
        parser.error("--workers: each worker reserves one CPU; add --nodes or --node-cpus")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    name = "group_bench_straggler" if args.straggler_ms else "group_bench"
    publish(name, report, format_table(report), args.out)


if __name__ == "__main__":
    main()
