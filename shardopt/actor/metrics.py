"""What the shard actors measure, as Ray metrics (``ray.util.metrics``).

Ray's metrics agent on each node exports these with the cluster's other metrics (scrape each
node's metrics export port; Ray prefixes application metrics with ``ray_``). The agent is part
of ``ray[default]``: where Ray runs without it (a plain ``pip install ray``), the actors still
record, and nothing is exported. Labels are bounded: optimizer class, shard index, group mode.

- ``shardopt_actor_step_seconds{optimizer, shard}``: a shard's own optimizer update, on its
  actor (without the trip from and to the proxy that ``shardopt_shard_step_seconds`` adds);
- ``shardopt_actor_round_wait_seconds{mode}``: how long a worker's push waited on a group shard
  for its round (sync) or for the shard (async);
- ``shardopt_actor_staleness_versions{mode}``: versions between the parameters a push was
  computed on and the update it was applied to;
- ``shardopt_actor_round_timeouts``: sync rounds that timed out waiting for ranks.

The metric objects are made once per actor process, when first used.

Talks to: Ray's metrics API (in the actor's process).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_metrics: dict[str, Any] = {}

SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
VERSIONS = [0.5, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128]


def _make() -> dict[str, Any]:
    from ray.util import metrics

    return {
        "step": metrics.Histogram(
            "shardopt_actor_step_seconds",
            description="A shard's optimizer update on its actor",
            boundaries=SECONDS,
            tag_keys=("optimizer", "shard"),
        ),
        "round_wait": metrics.Histogram(
            "shardopt_actor_round_wait_seconds",
            description="A push's wait on a group shard for its round (sync) or the shard (async)",
            boundaries=SECONDS,
            tag_keys=("mode",),
        ),
        "staleness": metrics.Histogram(
            "shardopt_actor_staleness_versions",
            description="Versions between a push's parameters and the update it was applied to",
            boundaries=VERSIONS,
            tag_keys=("mode",),
        ),
        "round_timeouts": metrics.Counter(
            "shardopt_actor_round_timeouts",
            description="Sync group rounds that timed out waiting for ranks",
            tag_keys=("mode",),
        ),
    }


def actor_metrics() -> dict[str, Any]:
    """This process's Ray metric objects (made on first use)."""
    with _lock:
        if not _metrics:
            _metrics.update(_make())
        return _metrics


def observe(name: str, value: float, **tags: str) -> bool:
    """Records ``value`` in the metric ``name`` of :func:`actor_metrics` (a counter adds it).

    Never fails the call that measured it: returns whether it recorded (a failure is logged
    at debug level).
    """
    try:
        metric = actor_metrics()[name]
        if hasattr(metric, "observe"):
            metric.observe(value, tags=tags)
        else:
            metric.inc(value, tags=tags)
        return True
    except Exception as err:  # metrics must never break a step
        logger.debug("metric %s not recorded: %s", name, err)
        return False
