"""A group shard host's push lanes, one per rank: a Unix step lane for a rank on its node that
reads its answers in shared memory, a network lane for a rank on another node.

Both kinds carry that rank's pushes only (a push in another rank's name is refused with a
``ValueError`` and changes nothing) and hand them to the host's ordinary push logic (a sync
round's sum, or an async step). A Unix lane (:mod:`shardopt.core.lane`) carries the request
alone: the gradients are in the rank's shared slot, and the answer's parameters are read in
shared memory. A network lane (:mod:`shardopt.core.net_lane`) carries the gradients, received
into a buffer of the rank's own, and answers with the parameters inline, sent from the shard's
memory: in sync mode its parameter buffer (which no round changes before this rank pushes
again), in async mode the rank's own snapshot, filled under the host's lock when it answers
this rank (:meth:`~shardopt.actor.group_buffers.RankSlots.publish`). While a network lane's
thread runs a push, :meth:`HostLanes.answers_inline` tells the host not to put the
parameters in the object store for that answer. Nothing on this path calls ``ray.put``.

Talks to: the lanes' sockets (:mod:`shardopt.core.lane`, :mod:`shardopt.core.net_lane`); its
host's push (:mod:`shardopt.actor.shard_group_host`, as callables it is given).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from shardopt.core.lane import LaneAddress, LaneServer
from shardopt.core.net_lane import NetLaneAddress, NetLaneServer
from shardopt.core.records import PushRequest, PushResult

Push = Callable[[PushRequest], PushResult]


def _checked(request: Any, rank: int) -> PushRequest:
    if not isinstance(request, PushRequest) or request.rank != rank:
        raise ValueError(f"a push lane of rank {rank} carries that rank's pushes only")
    return request


class HostLanes:
    """The open push lanes of one host, by rank (a rank has at most one)."""

    def __init__(self) -> None:
        self._lanes: dict[int, LaneServer | NetLaneServer] = {}
        self._inline = threading.local()  # the rank a network lane's thread is pushing for

    def open_unix(self, rank: int, push: Push, name: str) -> LaneAddress:
        """Opens (or opens again) ``rank``'s Unix lane; ``push`` serves its pushes."""
        self.close(rank)
        lane = self._lanes[rank] = LaneServer(lambda request: push(_checked(request, rank)), name)
        return lane.address

    def open_net(
        self,
        rank: int,
        bind: str,
        nbytes: int,
        push: Push,
        params: Callable[[], torch.Tensor],
        name: str,
    ) -> NetLaneAddress:
        """Opens (or opens again) ``rank``'s network lane on ``bind``, for a shard of ``nbytes``
        bytes: ``push`` serves its pushes (with the received gradients), ``params()`` is the
        buffer the answer's parameters are sent from once ``push`` returned."""

        def serve(request: Any, grads: np.ndarray) -> tuple[PushResult, torch.Tensor]:
            request = dataclasses.replace(_checked(request, rank), grads=grads)
            self._inline.rank = rank
            try:
                result = push(request)
            finally:
                self._inline.rank = None
            return result, params()

        self.close(rank)
        lane = self._lanes[rank] = NetLaneServer(bind, nbytes, serve, name)
        return lane.address

    def answers_inline(self, rank: int) -> bool:
        """Whether this thread is a network lane's, pushing for ``rank`` (its answer carries
        the parameters inline: nothing goes to the object store)."""
        return getattr(self._inline, "rank", None) == rank

    def __getitem__(self, rank: int) -> LaneServer | NetLaneServer:
        return self._lanes[rank]

    def __len__(self) -> int:
        return len(self._lanes)

    def close(self, rank: int) -> None:
        """Closes ``rank``'s lane, if it has one."""
        lane = self._lanes.pop(rank, None)
        if lane is not None:
            lane.close()

    def close_all(self) -> None:
        for rank in list(self._lanes):
            self.close(rank)
