"""A group shard's data path: gradient slots in shared memory for the workers on its node, and
the rank-order average of a sync round.

A worker on the same node as a group shard asks for :class:`~shardopt.core.records.RankBuffers`
once (:meth:`RankSlots.attach`): a gradient slot of its own, a shared-memory file laid out as the
shard's gradient buffer, which it fills at every step and pushes without sending the gradients
(``PushRequest.grads`` None); and in sync mode the shard's own parameter buffer, which every
rank on the node reads after a round (the buffer changes only when a round completes, and a
round needs every rank's push, so nobody reads while it changes). In sync mode rank 0's slot
*is* the shard's gradient buffer: the average starts from rank 0's gradients where they lie,
and with one worker nothing is copied at all. In async mode each push is applied on its own
while other ranks read, so parameters still come back through the object store there.

:func:`average_into` sums a round's gradients in rank order and divides by the world size,
exactly as before shared memory (the tests compare bits).

Talks to: the :class:`~shardopt.actor.shard.Shard` it serves; :mod:`shardopt.core.shm`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from shardopt.actor.shard import Shard
from shardopt.core import shm
from shardopt.core.buffers import FlatLayout, readonly_tensor
from shardopt.core.records import PushRequest, RankBuffers, SparseGrad

logger = logging.getLogger(__name__)


class RankSlots:
    """The gradient slots of the ranks on this shard's node (see the module docstring).

    Args:
        shard: the group's shard held here (its buffers must be in shared memory).
        mode: the group's mode, ``"sync"`` or ``"async"``.
    """

    def __init__(self, shard: Shard, mode: str) -> None:
        self._shard = shard
        self._mode = mode
        self._slots: dict[int, torch.Tensor] = {}  # rank -> its gradient buffer, mapped here
        self._handed_out: list[str] = []  # files a worker maps and unlinks (removed at close)

    def attach(self, rank: int) -> RankBuffers | None:
        """A rank's shared buffers (None: the shard's buffers are not in shared memory, or
        ``/dev/shm`` has no room: that rank uses the object store)."""
        buffers = self._shard.shared_buffers()
        if buffers is None:
            return None
        try:
            if self._mode == "sync" and rank == 0:
                slot, grad_path = self._shard.grad_buffer(), shm.link(buffers.grad_path)
            else:
                slot, grad_path = shm.create(buffers.nbytes)
            self._handed_out.append(grad_path)
            param_path = None
            if self._mode == "sync":
                param_path = shm.link(buffers.param_path)
                self._handed_out.append(param_path)
        except OSError as err:
            index = self._shard.shard_index
            logger.warning("shard %d: no shared buffers for rank %d (%s)", index, rank, err)
            return None
        self._slots[rank] = slot
        return RankBuffers(grad_path, param_path, buffers.nbytes)

    def reads_shared_params(self, rank: int) -> bool:
        """Whether ``rank`` reads the parameters in the shard's shared buffer."""
        return self._mode == "sync" and rank in self._slots

    def grads(self, request: PushRequest) -> torch.Tensor:
        """The flat gradients of a push: sent with it, or in the rank's slot.

        Raises:
            ValueError: a push without gradients from a rank that has no slot here.
        """
        if request.grads is not None:
            return readonly_tensor(request.grads)
        slot = self._slots.get(request.rank)
        if slot is None:
            raise ValueError(
                f"rank {request.rank} pushed no gradients to shard {self._shard.shard_index} "
                "and has no gradient slot there"
            )
        return slot

    def close(self) -> None:
        """Removes the files handed out and not mapped yet (mappings stay valid)."""
        for path in self._handed_out:
            shm.remove(path)
        self._handed_out.clear()
        self._slots.clear()


def average_into(
    target_flat: torch.Tensor,
    layout: FlatLayout,
    requests: Sequence[PushRequest],
    sources: Sequence[torch.Tensor],
    world_size: int,
) -> tuple[tuple[bool, ...], dict[int, SparseGrad]]:
    """A round's average gradient in ``target_flat``: for each parameter, the sum of the dense
    gradients in rank order (``requests`` are sorted by rank, ``sources`` their flat buffers),
    divided by the world size, as DistributedDataParallel averages; sparse gradients are
    concatenated and scaled. A source that already is ``target_flat`` (rank 0's slot) is not
    copied onto itself, and nothing is divided by a world size of one.

    Returns:
        Which slots hold a dense gradient, and the sparse gradients by slot.
    """
    has_grad, sparse = [], {}
    for j in range(len(layout)):
        dense = [src for r, src in zip(requests, sources) if r.has_grad[j]]
        if dense:
            target = layout.view(target_flat, j)
            first = layout.view(dense[0], j)
            if first.data_ptr() != target.data_ptr() or first.device != target.device:
                target.copy_(first)
            for src in dense[1:]:
                target.add_(layout.view(src, j).to(target.device))
            if world_size != 1:
                target.div_(world_size)
        has_grad.append(bool(dense))
        parts = [r.sparse_grads[j] for r in requests if j in r.sparse_grads]
        if parts:
            sparse[j] = SparseGrad(
                indices=np.concatenate([p.indices for p in parts], axis=1),
                values=np.concatenate([p.values for p in parts], axis=0) / world_size,
            )
    return tuple(has_grad), sparse
