"""How many torch threads each CPU shard, and the client beside them, run a step with.

A node's CPUs are split among the shards on it (a step keeps the client idle, so the shards
may use them all), and the client's copies get what they leave. "A node's CPUs" is the smaller
of two counts: Ray's logical CPUs on the node (what ``ray.init(num_cpus=...)`` or ``ray start
--num-cpus`` said, which may be more than the machine has) and the CPUs a process there can
run on (:func:`usable_cpus`: its affinity mask, cut to its cgroup's CPU quota), which every
host reports. Several Ray nodes on one machine (``ray.cluster_utils.Cluster``, or raylets
sharing a host) share its CPUs: shards are counted per machine too, by the nodes' IP address.

Threads beyond the cores do harm, not just nothing: torch's CPU kernels run a parallel region
per tensor, whose barrier waits for threads the kernel has descheduled. An AdamW step over
1,923 small tensors on 2 shards took 62.7 ms with 2 threads per shard on 2 cores, 30.3 ms with
one (``benchmarks/step_bench.py --sizes 2M --layers 160 --ray-cpus 4``).

Talks to: Ray (``ray.nodes()``), the OS (``sched_getaffinity``, the cgroup's ``cpu.max``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

CGROUP_V2_QUOTA = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cpus() -> int:
    """The CPUs this process can run on: its affinity mask, cut to its cgroup's CPU quota (a
    container's ``--cpus``), at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def cgroup_cpu_quota(
    v2: str = CGROUP_V2_QUOTA, v1: tuple[str, str] = CGROUP_V1_QUOTA
) -> int | None:
    """Whole CPUs this process's cgroup may use (its quota over its period, rounded down, at
    least one), or None without a quota."""
    try:
        with open(v2) as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota == "max":
            return None
        return max(1, int(quota) // int(period or 100_000))
    except (OSError, ValueError):
        pass
    try:
        with open(v1[0]) as f:
            quota_us = int(f.read())
        with open(v1[1]) as f:
            period_us = int(f.read())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else max(1, quota_us // period_us)


def threads_per_shard(infos: Sequence[dict[str, Any]], reserved: bool) -> list[int | None]:
    """Torch threads for each shard: the CPUs of its node and of its machine, each split among
    the shards there, whichever is fewer (at least one).

    Ray starts actors with one thread (``OMP_NUM_THREADS=1``) unless they reserve CPUs; a step
    keeps the client idle, so the shards may use the whole node. Left to Ray (None) when the
    shards ``reserved`` CPUs of their own.

    Args:
        infos: each shard's host's ``info()``: its ``node_id`` and ``cpus``
            (:func:`usable_cpus` there; missing: the node's logical CPUs alone count).
    """
    if reserved:
        return [None] * len(infos)
    nodes = _nodes()
    node_ids = [info["node_id"] for info in infos]
    known = [nodes.get(node, (1, node)) for node in node_ids]  # (logical CPUs, machine)
    machines = [machine for _, machine in known]
    threads: list[int | None] = []
    for node, (cpus, machine), info in zip(node_ids, known, infos):
        per_node = cpus // node_ids.count(node)
        machine_cpus = info.get("cpus")
        per_machine = per_node if machine_cpus is None else machine_cpus // machines.count(machine)
        threads.append(max(1, min(per_node, per_machine)))
    return threads


def threads_left(
    here: str,
    node_ids: list[str],
    devices: list[str],
    threads: list[int | None],
    reserved: float,
    cpus_here: int | None = None,
) -> int | None:
    """Torch threads the client may use for its copies while a step runs: the CPUs of its
    node (``here``) that the CPU shards there leave free, at least one (see
    :mod:`shardopt.core.omp_threads`); None (as many as it has) when no CPU shard runs there.

    Args:
        threads: each shard's torch threads (:func:`threads_per_shard`; None where its CPUs
            were ``reserved``: that many each).
        cpus_here: the CPUs this process can run on (default :func:`usable_cpus`); the node's
            logical CPUs count where they are fewer.
    """
    local = [s for s, node in enumerate(node_ids) if node == here and devices[s] == "cpu"]
    if not local:
        return None
    used = sum(reserved if threads[s] is None else threads[s] for s in local)
    cpus = min(_nodes().get(here, (1, here))[0], usable_cpus() if cpus_here is None else cpus_here)
    return max(1, int(cpus - used))


def _nodes() -> dict[str, tuple[int, str]]:
    """Each live node's logical CPUs, as Ray counts them, and its machine (its IP address), by
    node id."""
    import ray

    return {
        n["NodeID"]: (int(n.get("Resources", {}).get("CPU", 1)), n.get("NodeManagerAddress", ""))
        for n in ray.nodes()
        if n.get("Alive", True)
    }
