"""How gradients and parameters travel between this process and its shards in the Ray cluster.

A :class:`DataPath` owns each shard's flat gradient buffer on this side (a reused local one, or
the shard's shared-memory file mapped here), the shared-memory mapping of a shard's parameters
(and ``share_params``, which re-points the user's tensors into it), gradients shipped early
during backward (``overlap=True``), the user's in-place parameter edits, and the transport of a
shard's optimizer state. Backends compose one (:mod:`shardopt.client.local`,
:mod:`shardopt.client.shard_group`); where things are comes from their
:class:`~shardopt.client.shard_map.ShardMap`.

Talks to: shards through :class:`~shardopt.client.handles.ShardHandle`; :mod:`shardopt.core.shm`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get
from shardopt.client.shard_map import ShardMap
from shardopt.core import shm
from shardopt.core.amp import AmpScaling, unscale_sparse
from shardopt.core.buffers import (
    FlatLayout,
    PackedTree,
    empty_tree,
    readonly_tensor,
    to_numpy,
    unpack_tree,
)
from shardopt.core.records import ParamUpdate, SharedBuffers, SharedTree, SparseGrad


class GradShipper:
    """A post-accumulate-grad hook that ships one parameter's gradient (overlap=True)."""

    def __init__(self, data_path: DataPath, param_id: int):
        self._data_path = weakref.ref(data_path)
        self._param_id = param_id

    def __call__(self, param: torch.Tensor) -> None:
        data_path = self._data_path()
        if data_path is not None:
            data_path.ship_grad(self._param_id, param)


class DataPath:
    """The gradient and parameter buffers of one optimizer's shards, on this side.

    Args:
        shard_map: where each parameter lives.
        share_params: re-point the user's CPU parameters into the shards' shared buffers.
        replicated: the shards have replicas, which must see in-place parameter edits that
            are written straight into a shard's shared memory.
    """

    def __init__(self, shard_map: ShardMap, *, share_params: bool, replicated: bool) -> None:
        self._map = shard_map
        self._share_params = share_params
        self._replicated = replicated
        n = shard_map.num_shards
        self._mapped: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self._mapped_from: dict[int, SharedBuffers] = {}  # what each mapping came from
        self._staging: list[torch.Tensor | None] = [None] * n
        self._stage_on: list[tuple[torch.device, bool]] = [(torch.device("cpu"), False)] * n
        self._shipped: dict[int, tuple[int, int]] = {}  # id -> the gradient's (ptr, version)
        self._coalesced: dict[int, torch.Tensor] = {}  # id -> its sparse gradient, this step
        self._views: dict[tuple[int, int], tuple[torch.Tensor, FlatLayout, list[torch.Tensor]]]
        self._views = {}  # (shard, buffer address) -> the buffer, its layout, its typed views
        self.closed = False

    # ----- shared memory --------------------------------------------------------------------

    def shared_params(self, shard: int) -> torch.Tensor | None:
        """The shard's flat parameter buffer, mapped here (None: not in shared memory)."""
        mapped = self._mapped[shard]
        return None if mapped is None else mapped[0]

    @property
    def uses_shared_memory(self) -> list[bool]:
        return [m is not None for m in self._mapped]

    def map_shared(
        self, shard: int, buffers: SharedBuffers | None, params: list[torch.Tensor]
    ) -> None:
        """Maps a shard's shared parameter and gradient buffers here, then unlinks their files.

        A shard answers with the buffers it has now; when they are the ones already mapped (an
        ``add_param_group`` that gave it no parameters), the mapping stays. None drops it.
        """
        if buffers is not None and self._mapped[shard] is not None:
            if self._mapped_from.get(shard) == buffers:
                return
        self.forget_shipped(shard)  # gradients shipped early went to the buffers replaced here
        self._forget_views(shard)
        self._mapped_from.pop(shard, None)
        if buffers is None:
            self._mapped[shard] = None
            return
        mapped = tuple(
            shm.attach(path, buffers.nbytes) for path in (buffers.param_path, buffers.grad_path)
        )
        self._mapped[shard] = mapped
        self._mapped_from[shard] = buffers
        if self._share_params:
            share_params_into(mapped[0], self._map, shard, params)

    def close(self) -> None:
        """Drops the mappings (the memory goes once the shards drop theirs)."""
        self.closed = True
        self._mapped = [None] * len(self._mapped)
        self._mapped_from.clear()
        self._views.clear()

    def views(self, shard: int, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each of ``shard``'s tensors inside ``flat``, one of its buffers here
        (mapped or staging). Made once per buffer and layout: they stay from step to step, and
        a step then costs no Python per tensor to find its bytes."""
        layout = self._map.layout(shard)
        key = (shard, flat.data_ptr())
        cached = self._views.get(key)
        if cached is None or cached[0] is not flat or cached[1] is not layout:
            views = [layout.view(flat, j) for j in range(len(layout))]
            cached = self._views[key] = (flat, layout, views)
        return cached[2]

    def _forget_views(self, shard: int) -> None:
        for key in [k for k in self._views if k[0] == shard]:
            del self._views[key]

    # ----- gradients ------------------------------------------------------------------------

    def stage_on(self, shard: int, device: torch.device, pin_memory: bool = False) -> None:
        """Gathers a shard's gradients on ``device`` (a CUDA buffer for Ray Direct Transport),
        or in pinned CPU memory (``pin_memory``: copied from CUDA gradients faster)."""
        pin = pin_memory and device.type == "cpu" and torch.cuda.is_available()
        if self._stage_on[shard] != (device, pin):
            self._stage_on[shard] = (device, pin)
            self._staging[shard] = None
            self._forget_views(shard)
            self.forget_shipped(shard)

    def grad_buffer(self, shard: int) -> torch.Tensor:
        """Where a shard's gradients are gathered: its shared buffer, or a reused local one."""
        mapped = self._mapped[shard]
        if mapped is not None:
            return mapped[1]
        layout = self._map.layout(shard)
        staging = self._staging[shard]
        if staging is None or staging.numel() != layout.nbytes:
            device, pin = self._stage_on[shard]
            self._forget_views(shard)
            staging = self._staging[shard] = layout.empty(device, pin_memory=pin)
            self.forget_shipped(shard)
        return staging

    def grad_slot(self, pid: int) -> torch.Tensor | None:
        """Where :meth:`pack_grads` puts parameter ``pid``'s gradient, as a tensor shaped as
        it: its view in its shard's gradient buffer (the shared one, if mapped), for a
        parameter one shard holds whole in a CPU buffer; None for a split one, or a buffer on
        a GPU. A gradient written there and assigned to ``.grad`` costs the step no copy
        (torch's ``copy_`` of a tensor onto itself returns at once)."""
        pieces = self._map.pieces_of(pid)
        if len(pieces) != 1:
            return None
        shard, j = pieces[0]
        flat = self.grad_buffer(shard)
        return self.views(shard, flat)[j] if flat.device.type == "cpu" else None

    def forget_shipped(self, shard: int | None = None) -> None:
        """Gradients shipped early must be packed again (of ``shard``, or of every shard)."""
        if shard is None:
            self._shipped.clear()
            self._coalesced.clear()
            return
        for pid in self._map.ids_of(shard):
            self._shipped.pop(pid, None)

    @property
    def shipped(self) -> int:
        """How many gradients went out during backward since the last step."""
        return len(self._shipped)

    def ship_grad(self, pid: int, param: torch.Tensor) -> None:
        """Copies one gradient into its shard's buffer now (overlap=True, during backward)."""
        grad = param.grad
        if self.closed or grad is None or grad.is_sparse:
            return
        with torch.no_grad():
            for shard, j in self._map.pieces_of(pid):
                target = self.views(shard, self.grad_buffer(shard))[j]
                target.copy_(self._map.piece(shard, j, grad))
        self._shipped[pid] = (grad.data_ptr(), grad._version)

    def pack_grads(
        self, shard: int, params: list[torch.Tensor], scaling: AmpScaling | None = None
    ) -> tuple[torch.Tensor, tuple[bool, ...], dict[int, SparseGrad], list[int]]:
        """Writes a shard's dense gradients into one flat buffer (its shared one, if mapped).

        Sparse gradients are sent aside, coalesced (unscaled first under a GradScaler, as
        torch unscales them before its optimizer coalesces them).

        Returns:
            The buffer, which slots hold a dense gradient, the sparse gradients by slot, and
            the slots whose parameter has any gradient (the ones the step will change).
        """
        flat = self.grad_buffer(shard)
        views = self.views(shard, flat)
        has_grad, sparse, touched = [], {}, []
        targets, sources = [], []
        for j, slot in enumerate(self._map.slots(shard)):
            pid = slot.pid
            grad = params[pid].grad
            if grad is None:
                has_grad.append(False)
                continue
            touched.append(j)
            if grad.is_sparse:
                sparse[j] = self._sparse_piece(pid, grad, slot.rows, scaling)
                has_grad.append(False)
                continue
            if self._shipped.get(pid) != (grad.data_ptr(), grad._version):
                targets.append(views[j])
                sources.append(grad if slot.rows is None else grad[slot.rows[0] : slot.rows[1]])
            has_grad.append(True)
        if targets:  # one call: a copy_ each from Python costs more than a small tensor's copy
            torch._foreach_copy_(targets, sources)
        return flat, tuple(has_grad), sparse, touched

    def _sparse_piece(
        self,
        pid: int,
        grad: torch.Tensor,
        rows: tuple[int, int] | None,
        scaling: AmpScaling | None,
    ) -> SparseGrad:
        """The rows of a sparse gradient a piece holds (all of them for a whole tensor), with
        row indices counted from the piece's first row: a shard gets only its touched rows."""
        coalesced = self._coalesced.get(pid)
        if coalesced is None:  # once per step for all of a parameter's pieces
            coalesced = self._coalesced[pid] = unscale_sparse(grad, scaling).coalesce()
        indices, values = coalesced.indices(), coalesced.values()
        if rows is not None:
            keep = (indices[0] >= rows[0]) & (indices[0] < rows[1])
            indices, values = indices[:, keep].clone(), values[keep]
            indices[0] -= rows[0]
        return SparseGrad(indices=indices.cpu().numpy(), values=values.cpu().contiguous().numpy())

    # ----- parameters -----------------------------------------------------------------------

    def changed_params(self, shard: int, params: list[torch.Tensor]) -> ParamUpdate | None:
        """The user's parameters of ``shard`` modified since shardopt last wrote them.

        Where the shard's master copy is mapped here they are written into it at once, and the
        update is returned only for the shard's replica (None without replicas).
        """
        changed = self._map.changed_slots(shard, params)
        if not changed:
            return None
        slots = self._map.slots(shard)
        pieces = {j: self._map.piece(shard, j, params[slots[j].pid]).detach() for j in changed}
        mapped = self._mapped[shard]
        update = None
        if mapped is not None:
            layout = self._map.layout(shard)
            for j, piece in pieces.items():
                target = layout.view(mapped[0], j)
                if target.data_ptr() != piece.data_ptr():  # share_params: written
                    target.copy_(piece)
        if mapped is None or self._replicated:
            tensors = [piece.cpu() for piece in pieces.values()]
            layout = FlatLayout.for_tensors(tensors)
            update = ParamUpdate(tuple(changed), layout, to_numpy(layout.pack(tensors)))
        for j in changed:  # this shard's piece only: the others are sent to their shards
            self._map.record_slot(shard, j, params[slots[j].pid])
        return update

    # ----- optimizer state ------------------------------------------------------------------

    def request_state(self, handle: ShardHandle, param_ids: tuple[int, ...] | None = None) -> Any:
        """Asks a shard for its state: through a shared-memory file where it is on this node
        (read here without mapping it), else packed aside on the shard for
        :meth:`receive_state` to pull in chunks through Ray's object store."""
        if self._mapped[handle.index] is None:
            return handle, handle.pack_state(param_ids)
        return handle, handle.state_in_shared_memory(param_ids)

    @staticmethod
    def receive_state(request: tuple[ShardHandle, Any]) -> dict[int, Any]:
        """A shard's optimizer state by global id, as fresh CPU tensors.

        The client holds the tensors it fills and at most two chunks of
        :data:`STATE_CHUNK_BYTES` beyond them, never the shard's whole part a second time.
        """
        handle, ref = request
        answer = ray_get(ref)
        if isinstance(answer, SharedTree):
            tree, tensors = empty_tree(answer.skeleton, answer.layout)
            offsets = answer.layout.offsets
            shm.read_into(
                answer.path, [(offsets[i], t) for i, t in enumerate(tensors) if t.numel()]
            )
            return tree
        if isinstance(answer, PackedTree):  # the shard had no room in shared memory
            return unpack_tree(answer)
        token, skeleton, layout = answer
        tree, tensors = empty_tree(skeleton, layout)
        views = [t.reshape(-1).view(torch.uint8) for t in tensors]

        def write(i: int, at: int, data: torch.Tensor) -> None:
            views[i][at : at + data.numel()].copy_(data)

        try:
            pull_chunks(handle, token, layout, write)
        finally:
            handle.drop_state(token)
        return tree


def share_params_into(
    buffer: torch.Tensor, shard_map: ShardMap, shard: int, params: list[torch.Tensor]
) -> None:
    """Re-points the user's parameters that ``shard`` holds into its parameter ``buffer``
    (``share_params``): whole CPU tensors in torch's default layout only. A piece of a split
    tensor, or a tensor in another memory format (``channels_last``), stays a copy: re-pointing
    it would change its layout under the user's model."""
    layout = shard_map.layout(shard)
    for j, slot in enumerate(shard_map.slots(shard)):
        p = params[slot.pid]
        if p.device.type == "cpu" and slot.rows is None and p.is_contiguous():
            p.data = layout.view(buffer, j)
            shard_map.record(slot.pid, p)


STATE_CHUNK_BYTES = 16 << 20
"""The most of a shard's packed state one object-store transfer carries."""


def pull_chunks(
    handle: ShardHandle,
    token: str,
    layout: FlatLayout,
    write: Callable[[int, int, torch.Tensor], None],
) -> None:
    """Pulls a state the shard packed aside (:meth:`Shard.pack_state`), one chunk at a time with
    the next one on its way, handing each slot's bytes to ``write(slot, offset in the slot,
    bytes)`` as they arrive."""
    total = layout.nbytes
    sizes = [layout.tensor_nbytes(i) for i in range(len(layout))]
    offsets = layout.offsets

    def fetch(start: int) -> Any:
        return handle.state_chunk(token, start, min(start + STATE_CHUNK_BYTES, total))

    pending = fetch(0) if total else None
    first = 0  # the first slot that may overlap the current chunk
    for start in range(0, total, STATE_CHUNK_BYTES):
        stop = min(start + STATE_CHUNK_BYTES, total)
        following = fetch(stop) if stop < total else None
        chunk = readonly_tensor(ray_get(pending))
        while first < len(sizes) and offsets[first] + sizes[first] <= start:
            first += 1
        i = first
        while i < len(sizes) and offsets[i] < stop:
            a, b = max(start, offsets[i]), min(stop, offsets[i] + sizes[i])
            if a < b:
                write(i, a - offsets[i], chunk[a - start : b - start])
            i += 1
        del chunk
        pending = following
