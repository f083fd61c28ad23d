"""A group shard's data path: gradient slots in shared memory for the workers on its node, and
the rank-order average of a sync round.

A worker on the same node as a group shard asks for :class:`~shardopt.core.records.RankBuffers`
once (:meth:`RankSlots.attach`): a gradient slot of its own, a shared-memory file laid out as the
shard's gradient buffer, which it fills at every step and pushes without sending the gradients
(``PushRequest.grads`` None); and the shard's own parameter buffer, which it copies its
parameters from. In sync mode every rank on the node reads it after a round (the buffer changes
only when a round completes, and a round needs every rank's push, so nobody reads while it
changes). With one worker (either mode) its slot *is* the shard's gradient buffer and it reads
the shard's parameter buffer: nothing is copied at all. In async mode with more workers each
push is applied on its own while other ranks copy, so they copy under a
:class:`~shardopt.core.read_gate.ReadGate` (a shared lock; the shard changes its parameters
under the exclusive one, :meth:`RankSlots.writing`, and the gate tells a rank the version it
copied); the shard steps on the gradients where they are, in the rank's slot
(:meth:`RankSlots.grad_tensors`). A rank whose parameters *are* the buffer it reads
(``share_params``) must not see them change while it computes: in async mode it gets a
parameter buffer of its own, which the shard fills (:meth:`RankSlots.publish`) only when it
answers that rank. So does a rank on another node answered over a network lane
(:mod:`shardopt.actor.group_lanes`, :meth:`RankSlots.attach_remote`).

:class:`RoundSum` sums a sync round's gradients in rank order as the pushes arrive (rank ``k``
is added as soon as ranks ``0..k`` are in), so that the last push finds most of the work done.
It sums in rank order and divides by the world size, exactly as a round did before shared
memory (the tests compare bits).

Talks to: the :class:`~shardopt.actor.shard.Shard` it serves; :mod:`shardopt.core.shm`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from shardopt.actor.shard import Shard
from shardopt.core import chunk_codec, shm
from shardopt.core.buffers import readonly_tensor
from shardopt.core.errors import GroupTimeoutError
from shardopt.core.read_gate import ReadGate
from shardopt.core.records import PushRequest, RankBuffers, SparseGrad

logger = logging.getLogger(__name__)


class RankSlots:
    """The gradient slots of the ranks on this shard's node (see the module docstring).

    Args:
        shard: the group's shard held here (its buffers must be in shared memory).
        mode: the group's mode, ``"sync"`` or ``"async"``.
        world_size: the group's world size.
        version: the shard's version now (what its read gate says until the next change).
    """

    def __init__(self, shard: Shard, mode: str, world_size: int, version: int = 0) -> None:
        self._shard = shard
        self._mode = mode
        self._world_size = world_size
        self._changes_while_read = mode != "sync" and world_size > 1  # pushes apply one by one
        self._slots: dict[int, torch.Tensor] = {}  # rank -> its gradient buffer, mapped here
        self._reads: dict[int, torch.Tensor] = {}  # async: rank -> its own parameter buffer
        self._grad_tensors: dict[int, tuple[object, list[torch.Tensor]]] = {}  # (layout, views)
        self._handed_out: list[str] = []  # files a worker maps and unlinks (removed at close)
        self._gate: ReadGate | None = None  # async: the ranks copying the shard's buffer
        if self._changes_while_read and shard.shared_buffers() is not None:
            try:  # made now, so that its name is among the files a registry removes for a
                self._opened_gate(version)  # killed host (ShardGroupHost.info's shm_files)
            except OSError:  # no room: made (or not) at an attach, as the buffers
                pass

    def shared_paths(self) -> tuple[str, ...]:
        """The files in ``/dev/shm`` that stay named while the shard lives: its buffers' and
        (async) the read gate's."""
        gate = () if self._gate is None else (self._gate.path,)
        return (*self._shard.shared_paths(), *gate)

    def attach(self, rank: int, own_copy: bool = False, version: int = 0) -> RankBuffers | None:
        """A rank's shared buffers (None: the shard's buffers are not in shared memory, or
        ``/dev/shm`` has no room: that rank uses the object store).

        Args:
            own_copy: (async) the rank's parameters are the buffer it reads (``share_params``):
                it gets one of its own, filled when it is answered, instead of the shard's.
            version: the shard's version now (what the read gate says until the next change).
        """
        buffers = self._shard.shared_buffers()
        if buffers is None:
            return None
        try:
            if self._world_size == 1:
                slot, grad_path = self._shard.grad_buffer(), shm.link(buffers.grad_path)
            else:
                slot, grad_path = shm.create(buffers.nbytes)
            self._handed_out.append(grad_path)
            reads = gate_path = None
            if self._changes_while_read and own_copy:
                reads, param_path = shm.create(buffers.nbytes)
            else:
                param_path = shm.link(buffers.param_path)
                if self._changes_while_read:
                    gate_path = self._opened_gate(version).link()
                    self._handed_out.append(gate_path)
            self._handed_out.append(param_path)
        except OSError as err:
            index = self._shard.shard_index
            logger.warning("shard %d: no shared buffers for rank %d (%s)", index, rank, err)
            return None
        self._slots[rank] = slot
        self._grad_tensors.pop(rank, None)
        self._reads.pop(rank, None)
        if reads is not None:
            self._reads[rank] = reads
        return RankBuffers(grad_path, param_path, buffers.nbytes, gate_path)

    def _opened_gate(self, version: int) -> ReadGate:
        if self._gate is None:
            self._gate = ReadGate.create(version)
        return self._gate

    @contextlib.contextmanager
    def writing(self, group: str, timeout_s: float, version: Callable[[], int]) -> Iterator[None]:
        """A block that may change the shard's parameters: the ranks that copy them in place
        (async) wait until it is done, and then read the version it leaves (``version()``);
        see :class:`~shardopt.core.read_gate.ReadGate`.

        Raises:
            GroupTimeoutError: a rank held its copy's lock for more than ``timeout_s`` (the
                block did not run).
        """
        gate = self._gate
        if gate is None:
            yield
            return
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(gate.writing(timeout_s))
            except TimeoutError as err:
                raise GroupTimeoutError(f"group {group!r}: {err}") from None
            try:
                yield
            finally:
                gate.set_version(version())

    def attach_remote(self, rank: int) -> None:
        """``rank`` (on another node) is answered over a network lane: in async mode it gets a
        parameter buffer of its own here, which :meth:`publish` fills when it answers it."""
        if self._changes_while_read and rank not in self._reads:
            self._reads[rank] = torch.empty_like(self._shard.param_buffer())

    def inline_params(self, rank: int) -> torch.Tensor:
        """The buffer a network lane sends ``rank``'s answer's parameters from: the shard's own
        (sync: no round changes it before this rank pushes again) or the rank's (async)."""
        reads = self._reads.get(rank)
        return self._shard.param_buffer() if reads is None else reads

    def reads_shared_params(self, rank: int) -> bool:
        """Whether ``rank`` reads the parameters in shared memory: the shard's own buffer, or
        (async, ``own_copy``) its own (see :meth:`publish`)."""
        return rank in self._slots

    def publish(self, rank: int) -> None:
        """Before an answer to ``rank``: where it has a parameter buffer of its own (async,
        ``own_copy`` or a network lane), copies the shard's parameters into it, by one plain
        memcpy where it can be (:func:`~shardopt.core.chunk_codec.copy_fast`); the others read
        the shard's buffer itself.
        """
        reads = self._reads.get(rank)
        if reads is not None:
            flat = self._shard.param_buffer()
            chunk_codec.copy_fast(reads[: flat.numel()], flat)

    def has_gradients(self, request: PushRequest) -> bool:
        """Whether a push's gradients are at hand (sent with it, or in its rank's slot)."""
        return request.grads is not None or request.rank in self._slots

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

    def grad_tensors(self, request: PushRequest) -> list[torch.Tensor] | None:
        """(Async) the push's gradients where they are, as tensors laid out as the shard's
        parameters, for the step to read in place: a rank's slot (made once per rank). None:
        the gradients are already in the shard's gradient buffer (a group of one), or came
        with the push (the step copies them there).

        Raises:
            ValueError: a push without gradients from a rank that has no slot here.
        """
        if request.grads is not None:
            return None
        slot = self.grads(request)
        if slot.data_ptr() == self._shard.grad_buffer().data_ptr():
            return None
        layout = self._shard.layout
        made = self._grad_tensors.get(request.rank)
        if made is None or made[0] is not layout:
            made = (layout, [layout.bind(slot, i) for i in range(len(layout))])
            self._grad_tensors[request.rank] = made
        return made[1]

    def close(self) -> None:
        """Removes the files handed out and not mapped yet (mappings stay valid)."""
        for path in self._handed_out:
            shm.remove(path)
        self._handed_out.clear()
        self._slots.clear()
        self._reads.clear()
        self._grad_tensors.clear()
        if self._gate is not None:
            self._gate.close()
            self._gate = None


class RoundSum:
    """A sync round's gradient sum, built in rank order as the pushes arrive.

    Per parameter, the first rank (in rank order) with a dense gradient is copied into the
    shard's gradient buffer and every later one added, then the sum is divided by the world
    size: the operations a round always ran on each element, in the same order.
    A push withdrawn (a timeout) starts the sum over; the slots themselves are never written
    here, so nothing is lost.

    Args:
        slots: where each push's gradients are.
        shard: the shard whose gradient buffer receives the sum.
    """

    def __init__(self, slots: RankSlots, shard: Shard) -> None:
        self._slots = slots
        self._shard = shard
        self._added: list[int] = []  # ranks summed so far, in order
        self._started: list[bool] = []  # per parameter: whether the buffer holds a partial sum

    def reset(self) -> None:
        """Forgets the partial sum (a push was withdrawn, or the round ended)."""
        self._added, self._started = [], []

    def take(self, arrived: dict[int, PushRequest], ranks: Sequence[int]) -> None:
        """Adds the next ranks of ``ranks`` (the round's, in order) that have arrived."""
        for rank in ranks[len(self._added) :]:
            request = arrived.get(rank)
            if request is None or request.skip:
                return  # (a skip vote: the round updates nothing, its sum is never used)
            if not self._slots.has_gradients(request):
                return  # a push without gradients fails the whole round in finish()
            self._add(request)

    def _add(self, request: PushRequest) -> None:
        layout, target_flat = self._shard.layout, self._shard.grad_buffer()
        if not self._started:
            self._started = [False] * len(layout)
        source = self._slots.grads(request)
        for j in range(len(layout)):
            if not request.has_grad[j]:
                continue
            target, src = layout.view(target_flat, j), layout.view(source, j)
            if self._started[j]:
                target.add_(src.to(target.device))
            elif src.data_ptr() != target.data_ptr() or src.device != target.device:
                target.copy_(src)
            self._started[j] = True
        self._added.append(request.rank)

    def finish(
        self, requests: Sequence[PushRequest], world_size: int
    ) -> tuple[tuple[bool, ...], dict[int, SparseGrad]]:
        """The round's average in the shard's gradient buffer (``requests``: the whole round,
        in rank order).

        Returns:
            Which slots hold a dense gradient, and the sparse gradients by slot.

        Raises:
            ValueError: a push without gradients from a rank without a slot.
        """
        try:
            if self._added != [r.rank for r in requests[: len(self._added)]]:
                self.reset()  # not a prefix of this round (the round's ranks changed)
            for request in requests[len(self._added) :]:
                self._add(request)
            layout = self._shard.layout
            started = self._started or [False] * len(layout)
            if world_size != 1:
                for j in range(len(layout)):
                    if started[j]:
                        layout.view(self._shard.grad_buffer(), j).div_(world_size)
            return tuple(started), sparse_average(requests, len(layout), world_size)
        finally:
            self.reset()


def sparse_average(
    requests: Sequence[PushRequest], count: int, world_size: int
) -> dict[int, SparseGrad]:
    """A round's sparse gradients by slot: every rank's, concatenated and scaled."""
    sparse = {}
    for j in range(count):
        parts = [r.sparse_grads[j] for r in requests if j in r.sparse_grads]
        if parts:
            sparse[j] = SparseGrad(
                indices=np.concatenate([p.indices for p in parts], axis=1),
                values=np.concatenate([p.values for p in parts], axis=0) / world_size,
            )
    return sparse
