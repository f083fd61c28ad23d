"""The shared-memory files of a shard group's hosts, at the group's end: each host is asked to
remove its own (:func:`close_hosts`); those of hosts that died first are removed for them
(:func:`remove_files`), on the registry's node directly and on any other node by a task there,
since the registry may run on a node without shards (a group's shards go where its workers
are, :mod:`shardopt.actor.placement`).

Talks to: Ray (actor calls, tasks pinned to a node), the file system (``/dev/shm``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

REMOVE_FILES_TIMEOUT_S = 30.0
"""How long a group's teardown waits for the files of its dead hosts on other nodes to go."""


def close_hosts(hosts: list[Any], timeout_s: float = 10.0) -> list[Any]:
    """Asks a group's shard hosts to remove their shared-memory files before they are killed.
    Returns the hosts that did not (already dead)."""
    refs = [h.close.remote() for h in hosts]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    except Exception as err:  # the cluster is going away
        logger.debug("closing group hosts: %s", err)
    failed = []
    for host, ref in zip(hosts, refs):
        try:
            ray.get(ref, timeout=0)
        except Exception as err:  # dead, or not done in time
            logger.debug("group host not closed: %s", err)
            failed.append(host)
    return failed


def _remove_shm_files(paths: list[str]) -> None:
    """Removes these files if they are shardopt's shared-memory files (in ``/dev/shm``)."""
    from shardopt.core import shm  # torch: only where there are files to remove

    for path in paths:
        if os.path.dirname(path) == shm.SHM_DIR:
            shm.remove(path)
            logger.info("removed %s, a file of a lost group shard host", path)


_remove_shm_files_there = ray.remote(num_cpus=0, max_retries=0)(_remove_shm_files)


def remove_files(files: dict[str, tuple[str, tuple[str, ...]]], hosts: list[Any]) -> None:
    """Removes the shared-memory files of dead shard ``hosts`` (recorded when they were made:
    actor id -> node, paths): here for those on this node, by a task on their node for the
    others (a node that is gone took its files with it)."""
    here = ray.get_runtime_context().get_node_id()
    by_node: dict[str, list[str]] = {}
    for host in hosts:
        node, paths = files.get(host._actor_id.hex(), ("", ()))
        if paths:
            by_node.setdefault(node, []).extend(paths)
    if here in by_node:
        _remove_shm_files(by_node.pop(here))
    refs = [
        _remove_shm_files_there.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        ).remote(paths)
        for node, paths in by_node.items()
    ]
    if refs:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=REMOVE_FILES_TIMEOUT_S)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as err:  # the node is gone (and its files with it)
                logger.debug("shared-memory files of a lost group shard host: %s", err)
