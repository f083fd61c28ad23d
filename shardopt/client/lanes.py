"""A client's step lanes (:mod:`shardopt.core.lane`) to the shards on its node, its network lanes
(:mod:`shardopt.core.net_lane`) to CPU shards on other nodes, and the wait for the first answer
among lanes and Ray refs.

Both the plain optimizer (:mod:`shardopt.client.local`) and a shard group's worker
(:mod:`shardopt.client.shard_group`) send the step's small request over a lane where the shard
shares memory with them, and through Ray otherwise; both send their gradients for a shard on
another node over a network lane, where they have one. A lane belongs to the
shard host it was opened on: once a shard's handle changes (its host replaced), its lane is no
longer used.

Talks to: the lanes' sockets (:class:`~shardopt.core.lane.LaneClient`,
:class:`~shardopt.core.net_lane.NetLaneClient`) and Ray (``ray.wait``).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import cloudpickle

from shardopt.client.runtime import ray_get
from shardopt.core.lane import LaneAddress, LaneBroken, LaneClient, plain_dumps
from shardopt.core.net_lane import NetLaneAddress, NetLaneClient

logger = logging.getLogger(__name__)

LANE_TYPES = (LaneClient, NetLaneClient)
"""The lanes' client ends (an answer :func:`first_answer` returns is one, or a Ray ref)."""
NET_LANES_ENV = "SHARDOPT_NET_LANES"
"""Set to ``0`` to send steps and group pushes to shards on other nodes through Ray (as before
network lanes; for comparisons)."""


def dump_request(request: Any) -> bytes:
    """``request`` pickled for a lane: by plain pickle, or where that fails on a value a user
    put in it (a lambda or a local class's object in a param group's options, which torch
    keeps) by cloudpickle, as Ray pickles the same request on its own path. Either loads with
    ``pickle.loads`` in the shard's Ray worker."""
    try:
        return plain_dumps(request)
    except (pickle.PicklingError, AttributeError, TypeError):
        return cloudpickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)


def net_lanes_enabled() -> bool:
    """Whether clients open network lanes (unless :data:`NET_LANES_ENV` is ``0``)."""
    return os.environ.get(NET_LANES_ENV, "1") != "0"


class Lanes:
    """The open lanes, one per shard, each tied to the host (``owner``) it was opened on."""

    def __init__(self) -> None:
        self._lanes: dict[int, tuple[Any, LaneClient | NetLaneClient]] = {}

    def open(self, shard: int, owner: Any, address: LaneAddress | NetLaneAddress | None) -> None:
        """Connects to ``address`` (None: the host offered no lane); a lane that cannot connect
        is left out (the shard's steps go through Ray)."""
        self.close(shard)
        if address is None:
            return
        try:
            if isinstance(address, NetLaneAddress):
                self._lanes[shard] = (owner, NetLaneClient(address, dump_request))
            else:
                self._lanes[shard] = (owner, LaneClient(address, dump_request))
        except LaneBroken as err:
            logger.debug("shard %d: %s", shard, err)

    def get(self, shard: int, owner: Any) -> LaneClient | NetLaneClient | None:
        """The shard's lane, if it has an open one to ``owner``."""
        entry = self._lanes.get(shard)
        if entry is None or entry[0] is not owner or entry[1].closed:
            return None
        return entry[1]

    def send(
        self, shard: int, owner: Any, request: Any, payload: Any = None
    ) -> LaneClient | NetLaneClient | None:
        """Sends ``request`` over the shard's lane (with ``payload`` on a network lane); None
        where it has none or it broke (the caller sends it through Ray)."""
        lane = self.get(shard, owner)
        if lane is None:
            return None
        try:
            if isinstance(lane, NetLaneClient):
                lane.send(request, payload)
            else:
                lane.send(request)
            return lane
        except LaneBroken as err:
            logger.debug("shard %d: %s", shard, err)
            self.close(shard)
            return None

    def close(self, shard: int) -> None:
        entry = self._lanes.pop(shard, None)
        if entry is not None:
            entry[1].close()

    def close_all(self) -> None:
        for shard in list(self._lanes):
            self.close(shard)

    def is_net(self, shard: int) -> bool:
        """Whether the shard's open lane (if any) is a network lane."""
        entry = self._lanes.get(shard)
        return entry is not None and isinstance(entry[1], NetLaneClient)

    @property
    def net(self) -> int:
        """How many of the open lanes are network lanes (to shards on other nodes)."""
        return sum(isinstance(lane, NetLaneClient) for _, lane in self._lanes.values())

    def __len__(self) -> int:
        return len(self._lanes)


LAND_S = 10.0
"""How long a step or push stopped part-way (Ctrl-C) waits for the shards it was sent to."""


def first_answer(pending: dict[Any, int], timeout_s: float | None = None) -> tuple[Any, int]:
    """Takes out of ``pending`` (Ray refs and lanes, each to its shard) the first one whose
    answer is in, waiting for it (at most ``timeout_s``: then :class:`TimeoutError`)."""
    lanes = {k.fileno(): k for k in pending if isinstance(k, LANE_TYPES)}
    refs = [k for k in pending if not isinstance(k, LANE_TYPES)]
    poller = select.poll()  # not select(): a busy process's descriptors pass FD_SETSIZE
    for fd in lanes:
        poller.register(fd, select.POLLIN)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:  # both kinds at once only when some shards are on other nodes: poll in turn
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1e3))
        if lanes:
            ready = poller.poll(1 if refs else wait_ms)
            if ready:
                lane = lanes[ready[0][0]]
                return lane, pending.pop(lane)
        if refs:
            wait_s = None if wait_ms is None else wait_ms / 1e3
            done, _ = ray.wait(refs, num_returns=1, timeout=0.001 if lanes else wait_s)
            if done:
                return done[0], pending.pop(done[0])
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no answer from shard(s) {sorted(pending.values())}")


def land(pending: dict[Any, int], take: Callable[[Any, int], None], what: str) -> None:
    """(A step or push stopped part-way) Reads the answers still ``pending``, waiting at most
    ``LAND_S`` in all, and hands each to ``take(answer, shard)``. Whatever stopped the caller
    is what it raises: a shard's own error here, or the time running out (the shards not heard
    from stay in ``pending``), is only logged, naming ``what`` stopped."""
    deadline = time.monotonic() + LAND_S
    while pending:
        try:
            answer, s = first_answer(pending, max(0.0, deadline - time.monotonic()))
        except Exception as err:  # (a TimeoutError) the caller closes what is left
            logger.warning("%s stopped part-way: %s in %g s", what, err, LAND_S)
            return
        try:
            take(answer, s)
        except Exception as err:
            logger.warning("%s stopped part-way; shard %d: %s", what, s, err)


def answer_of(answer: Any) -> Any:
    """The result behind what :func:`first_answer` returned: a lane's answer, or a Ray ref's
    (raising what the call raised; a lane that broke raises :class:`LaneBroken`)."""
    return answer.receive() if isinstance(answer, LANE_TYPES) else ray_get(answer)
