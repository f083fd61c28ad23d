"""shardopt's Prometheus metrics in the process that holds the optimizers: names, labels, buckets.

Every metric is named ``shardopt_...`` and lives in :data:`REGISTRY` (shardopt's own registry,
with the process's CPU and memory): ``shardopt serve --metrics-port`` serves it as Prometheus
text (:func:`start_http_server`); a training process can serve it the same way. Labels are
bounded: optimizer class names, shard indices, gRPC method names and status codes, lifecycle
event names, and a token's scope (16 hex digits of its hash, as the gateway names its
directories), never a token itself.

What the actors record (a shard's own step time, a sync round's wait) is in
:mod:`shardopt.actor.metrics`, exported by Ray's metrics agent; what the gateway records about
its calls is recorded by :mod:`shardopt.gateway.observability` into the metrics below.

Talks to nothing: prometheus_client objects that other modules record into.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import start_http_server as _start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
"""shardopt's metrics (and this process's CPU, memory and Python runtime)."""
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Buckets of latencies, 0.5 ms to a minute."""
LONG_SECONDS = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Buckets of checkpoint durations, 10 ms to half an hour."""
VERSIONS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)
"""Buckets of staleness and lag, in versions or steps."""

# ----- steps ------------------------------------------------------------------------------------

STEP_SECONDS = Histogram(
    "shardopt_step_seconds",
    "One optimizer.step() as the proxy sees it (closure, gradients out, every shard's update, "
    "parameters back), by optimizer class and backend (local, lbfgs, group, gateway)",
    ["optimizer", "backend"],
    buckets=SECONDS,
    registry=REGISTRY,
)
SHARD_STEP_SECONDS = Histogram(
    "shardopt_shard_step_seconds",
    "From sending a step to one shard to its answer, as the proxy sees it, by optimizer class "
    "and shard index",
    ["optimizer", "shard"],
    buckets=SECONDS,
    registry=REGISTRY,
)
STEP_BYTES = Counter(
    "shardopt_step_bytes",
    "Bytes of gradients sent to shards (out) and parameters received from them (in) by steps "
    "through Ray's object store (shared memory moves none)",
    ["direction"],
    registry=REGISTRY,
)

# ----- shard groups -----------------------------------------------------------------------------

GROUP_PUSH_SECONDS = Histogram(
    "shardopt_group_push_seconds",
    "From a worker's push to a group shard to its answer (in sync mode, the wait for the round "
    "of every rank), by mode",
    ["mode"],
    buckets=SECONDS,
    registry=REGISTRY,
)
GROUP_STALENESS = Histogram(
    "shardopt_group_staleness_versions",
    "Versions between the parameters a worker's gradients were computed on and the update they "
    "were applied to (0 in sync mode)",
    ["mode"],
    buckets=VERSIONS,
    registry=REGISTRY,
)
GROUP_STALE_PUSHES = Counter(
    "shardopt_group_stale_pushes",
    "Pushes a group shard refused as staler than max_staleness",
    registry=REGISTRY,
)

# ----- replicas ---------------------------------------------------------------------------------

REPLICA_LAG = Histogram(
    "shardopt_replica_lag_steps",
    "Steps a replica had not applied yet, seen before each step of its primary (with "
    "replica_refresh=k: the steps logged since the last refresh)",
    buckets=VERSIONS,
    registry=REGISTRY,
)

# ----- checkpoints ------------------------------------------------------------------------------

CHECKPOINT_SECONDS = Histogram(
    "shardopt_checkpoint_seconds",
    "A checkpoint save (from the call to the commit) or load, by operation",
    ["operation"],
    buckets=LONG_SECONDS,
    registry=REGISTRY,
)
CHECKPOINT_BYTES = Counter(
    "shardopt_checkpoint_bytes",
    "Bytes of checkpoint data files a committed save wrote (as its commit record lists them)",
    ["operation"],
    registry=REGISTRY,
)

# ----- lifecycle events (see shardopt.core.events) ----------------------------------------------

EVENTS = Counter(
    "shardopt_events",
    "Lifecycle events (shard_lost, replica_promoted, worker_dropped, round_timeout, "
    "checkpoint_committed, session_opened, ...), each also logged as one line",
    ["event"],
    registry=REGISTRY,
)

# ----- the gateway ------------------------------------------------------------------------------

GATEWAY_RPC_SECONDS = Histogram(
    "shardopt_gateway_rpc_seconds",
    "A gateway call from its start to its status, streams included, by method and status code",
    ["method", "code"],
    buckets=SECONDS,
    registry=REGISTRY,
)
GATEWAY_BYTES = Counter(
    "shardopt_gateway_bytes",
    "Serialized message bytes the gateway received (in) and sent (out), by method",
    ["method", "direction"],
    registry=REGISTRY,
)
GATEWAY_QUOTA_REFUSALS = Counter(
    "shardopt_gateway_quota_refusals",
    "Calls refused with RESOURCE_EXHAUSTED (a token's quota, the gateway's limits, calls in "
    "flight), by token scope and method",
    ["scope", "method"],
    registry=REGISTRY,
)

_server_lock = threading.Lock()


def start_http_server(port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
    """Serves :data:`REGISTRY` as Prometheus text at ``http://host:port/metrics`` from a daemon
    thread.

    Returns:
        The HTTP server (``shutdown()`` stops it) and the port it listens on (``port`` 0 picks
        a free one).
    """
    with _server_lock:
        server, _thread = _start_http_server(port, addr=host, registry=REGISTRY)
    return server, server.server_address[1]
