"""Lifecycle events as structured log lines: one line per event, ``event=NAME key=value ...``.

What operators need to see happen (a shard lost, a replica promoted, a worker dropped from its
group, a sync round timed out, a checkpoint committed, a session opened or expired) is logged
through :func:`emit` by the module where it happens, on that module's own logger
(``logging.getLogger(__name__)``), in one format that ``grep``, ``awk`` and log pipelines read:

    event=replica_promoted shard=1 node=5f3c... recoveries=1

Values are written bare when they are simple words or numbers and JSON-quoted otherwise
(spaces, quotes, ``=``); keys come in the order given. Each event also counts in the
``shardopt_events_total{event=...}`` metric of the process (:mod:`shardopt.core.metrics`).

:data:`EVENTS` lists every event name and what it means (the README's table is made from it).

Talks to: :mod:`logging` and :mod:`shardopt.core.metrics`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from shardopt.core.metrics import EVENTS as EVENT_COUNTER

EVENTS: dict[str, str] = {
    "shard_lost": "a shard's actor died or its node went away (a step found it)",
    "replica_promoted": "a lost shard's replica took over as its primary",
    "replica_lost": "a shard's replica was lost; a new one is being built",
    "replica_rebuilt": "a new replica is being built from an export of its primary",
    "shard_restored": "a shard and its replica were both lost; rebuilt from a checkpoint",
    "step_rolled_back": "a step failed on some shards; all were rolled back from their replicas",
    "step_failed": "a step failed on some shards after others applied it (no replicas)",
    "worker_attached": "a worker (rank) attached to a shard group",
    "worker_detached": "a worker left its shard group (close())",
    "worker_dropped": "a worker's Ray job ended; the registry detached it from its group",
    "worker_admitted": "a worker joined an elastic group, from the round not yet decided",
    "member_dropped": "an elastic group dropped a member (died, no heartbeat, or left)",
    "group_created": "a shard group was created by its first worker",
    "group_closed": "a shard group was torn down",
    "round_timeout": "a sync group round waited longer than its timeout for missing ranks",
    "checkpoint_committed": "a checkpoint save committed (its files, then the commit record)",
    "checkpoint_loaded": "a checkpoint was loaded on every shard",
    "session_opened": "a gateway session was opened",
    "session_closed": "a gateway session was closed by its client",
    "session_expired": "a gateway session was unused for --session-idle-timeout and closed",
    "stream_cancelled": "the gateway cancelled a stream that waited too long for its client",
    "gateway_started": "shardopt serve started serving",
    "sessions_resumed": "a gateway resumed the sessions its session store recorded",
    "gateway_stopping": "shardopt serve began its graceful shutdown",
}
"""Every event :func:`emit` logs, with its meaning."""

_BARE = re.compile(r"[A-Za-z0-9_.:/@+-]+")


def _value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def format_event(event: str, **fields: Any) -> str:
    """The line of an event: ``event=NAME key=value ...`` (values quoted where needed)."""
    return " ".join([f"event={event}", *(f"{k}={_value(v)}" for k, v in fields.items())])


def parse_event(line: str) -> dict[str, str]:
    """The fields of an event line (``event`` included), values unquoted: for tests and tools.

    Raises:
        ValueError: a line that is not an event line.
    """
    fields: dict[str, str] = {}
    pos = 0
    pattern = re.compile(r'\s*([A-Za-z_]+)=("(?:[^"\\]|\\.)*"|\S*)')
    while pos < len(line.rstrip()):
        match = pattern.match(line, pos)
        if match is None:
            raise ValueError(f"not an event line: {line!r}")
        key, value = match.groups()
        fields[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
    if "event" not in fields:
        raise ValueError(f"not an event line: {line!r}")
    return fields


def emit(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> str:
    """Logs one event line on ``logger`` and counts it; returns the line.

    Args:
        logger: the logger of the module where the event happened.
        event: one of :data:`EVENTS`.
        level: ``logging.WARNING`` for losses and failures, INFO for the rest.
        **fields: what identifies the event (shard, group, rank, path, seconds, ...).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    line = format_event(event, **fields)
    EVENT_COUNTER.labels(event).inc()
    logger.log(level, line)
    return line
