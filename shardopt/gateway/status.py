"""What a gateway says about its sessions and their shards (``GetShardStatus``, ``ListSessions``).

A tenant sees its own sessions only (the token that opened them); an operator's token
(``shardopt serve --operator-token-file``) may ask for every tenant's, each named by its token's
scope (a hash, never the token). A session's shards are asked for their status without taking
the session's lock, so a session busy in a long step still answers; a shard that cannot be
reached leaves ``shards_error`` set instead of failing the whole list.

Talks to: the sessions' optimizers (``shard_status()`` and the shards' nodes, through Ray).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shardopt.core.proto import pb
from shardopt.gateway.admission import SCOPE_CHARS, scope_of
from shardopt.gateway.sessions import Session

logger = logging.getLogger(__name__)


def shard_infos(session: Session, with_ids: bool = False) -> list[Any]:
    """The ``ShardInfo`` of each of a session's shards (asks every shard, through Ray); with
    ``with_ids``, which parameters have state.

    Raises:
        OptimizerClosedError: the session was closed meanwhile.
        ShardUnavailableError: a shard's actor is gone.
    """
    optimizer = session.optimizer
    statuses = optimizer.shard_status()
    nodes = optimizer.backend.shard_nodes()

    def node(index: int) -> str:
        return (nodes[index] if index < len(nodes) else None) or ""

    return [
        pb.ShardInfo(
            shard=s.shard_index,
            device=s.device,
            node_id=node(s.shard_index),
            num_params=s.num_params,
            param_bytes=s.param_bytes,
            last_step=s.last_step_id,
            params_with_state=len(s.state_ids),
            fused=s.fused,
            state_params=s.state_ids if with_ids else (),
        )
        for s in statuses
    ]


def session_info(session: Session, with_shards: bool = True) -> Any:
    """A session as ``SessionInfo``: its optimizer, sizes, steps, ages, group and shards."""
    now = time.monotonic()
    optimizer = session.optimizer
    group = optimizer.group
    info = pb.SessionInfo(
        session_id=session.session_id,
        scope=scope_of(session.principal),
        optimizer=optimizer.optimizer_class.__name__,
        num_params=len(session.params),
        param_bytes=session.nbytes,
        steps=session.steps,
        age_seconds=now - session.opened,
        idle_seconds=0.0 if session.active else now - session.last_used,
    )
    if group is not None:  # the name the client gave: without its token's scope prefix
        info.group = group.name[SCOPE_CHARS + 1 :]
        info.rank = group.rank
    if with_shards:
        try:
            info.shards.extend(shard_infos(session))
        except Exception as err:  # closed meanwhile, or a shard lost: say so, list the rest
            info.shards_error = f"{type(err).__name__}: {err}"
    return info
