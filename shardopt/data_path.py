"""How gradients and parameters travel between the proxy and its shards in the Ray cluster.

A mixin of :class:`~shardopt.optimizer.ShardedOptimizer` for one concern: each shard's flat
gradient buffer (a reused local one, or the shard's shared-memory file mapped here), gradients
shipped early during backward (``overlap=True``), the parameters the user changed in place
(version counters), the shared-memory mapping of a shard's buffers (and ``share_params``), the
torch threads each shard host gets, and the transport of a shard's optimizer state.

The state it works on (``_layouts``, ``_shard_params``, ``_shm``, ``_staging``, ``_shipped``,
``_versions``) is set up by the proxy's constructor.

Talks to: shard hosts through the proxy's ``_call``; :mod:`shardopt.shm` for shared memory.
"""

from __future__ import annotations

import weakref
from typing import Any

import ray
import torch

from shardopt import shm
from shardopt.amp import AmpScaling, unscale_sparse
from shardopt.buffers import FlatLayout, PackedTree, to_numpy, unpack_tree
from shardopt.records import ParamUpdate, SharedBuffers, SharedTree, SparseGrad
from shardopt.runtime import ray_get


class GradShipper:
    """A post-accumulate-grad hook that ships one parameter's gradient (overlap=True)."""

    def __init__(self, optimizer: LocalDataPath, param_id: int):
        self._optimizer = weakref.ref(optimizer)
        self._param_id = param_id

    def __call__(self, param: torch.Tensor) -> None:
        optimizer = self._optimizer()
        if optimizer is not None:
            optimizer._ship_grad(self._param_id, param)


class LocalDataPath:
    """The proxy's data path to shards in the Ray cluster (a mixin; see the module docstring)."""

    def _threads_per_shard(self, nodes: list[str]) -> list[int | None]:
        """Torch threads for each shard: its node's CPUs split among this optimizer's shards there.

        Ray starts actors with one thread (``OMP_NUM_THREADS=1``) unless they reserve CPUs; a
        step keeps the client idle, so the shards may use the whole node. Left to Ray when
        ``actor_options`` reserves ``num_cpus``.
        """
        if "num_cpus" in self._actor_options:
            return [None] * len(nodes)
        cpus = {n["NodeID"]: int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes()}
        return [max(1, cpus.get(node, 1) // nodes.count(node)) for node in nodes]

    def _map_shared(self, shard: int, buffers: SharedBuffers | None) -> None:
        """Maps a shard's shared parameter and gradient buffers here, then unlinks their files.

        A shard answers with the buffers it has now; when they are the ones already mapped (an
        ``add_param_group`` that gave it no parameters), the mapping stays.
        """
        if buffers is not None and self._shm[shard] is not None:
            if self._mapped_from.get(shard) == buffers:
                return
        self._forget_shipped(shard)  # gradients shipped early went to the buffers replaced here
        self._mapped_from.pop(shard, None)
        if buffers is None:
            self._shm[shard] = None
            return
        mapped = tuple(
            shm.attach(path, buffers.nbytes) for path in (buffers.param_path, buffers.grad_path)
        )
        self._shm[shard] = mapped
        self._mapped_from[shard] = buffers
        if self._share_params:
            params = self._flat_params()
            layout = self._layouts[shard]
            for j, pid in enumerate(self._shard_params[shard]):
                p = params[pid]
                if p.device.type == "cpu":
                    p.data = layout.view(mapped[0], j)
                    self._record_version(pid, p)

    def _grad_buffer(self, shard: int) -> torch.Tensor:
        """Where a shard's gradients are gathered: its shared buffer, or a reused local one."""
        shm = self._shm[shard]
        if shm is not None:
            return shm[1]
        layout = self._layouts[shard]
        staging = self._staging[shard]
        if staging is None or staging.numel() != layout.nbytes:
            staging = self._staging[shard] = layout.empty()
            self._forget_shipped(shard)
        return staging

    def _forget_shipped(self, shard: int) -> None:
        for pid in self._shard_params[shard]:
            self._shipped.pop(pid, None)

    def _ship_grad(self, pid: int, param: torch.Tensor) -> None:
        """Copies one gradient into its shard's buffer now (overlap=True, during backward)."""
        grad = param.grad
        if self._closed or grad is None or grad.is_sparse:
            return
        shard, j = self._local[pid]
        with torch.no_grad():
            self._layouts[shard].view(self._grad_buffer(shard), j).copy_(grad)
        self._shipped[pid] = (grad.data_ptr(), grad._version)

    def _pack_grads(
        self, shard: int, params: list[torch.Tensor], scaling: AmpScaling | None = None
    ) -> tuple[torch.Tensor, tuple[bool, ...], dict[int, SparseGrad], list[int]]:
        """Writes a shard's dense gradients into one flat buffer (its shared one, if mapped).

        Sparse gradients are sent aside, coalesced (unscaled first under a GradScaler, as
        torch unscales them before its optimizer coalesces them).

        Returns:
            The buffer, which slots hold a dense gradient, the sparse gradients by slot, and
            the slots whose parameter has any gradient (the ones the step will change).
        """
        layout = self._layouts[shard]
        flat = self._grad_buffer(shard)
        has_grad, sparse, touched = [], {}, []
        for j, pid in enumerate(self._shard_params[shard]):
            grad = params[pid].grad
            if grad is None:
                has_grad.append(False)
                continue
            touched.append(j)
            if grad.is_sparse:
                grad = unscale_sparse(grad, scaling).coalesce()
                sparse[j] = SparseGrad(
                    indices=grad.indices().cpu().numpy(),
                    values=grad.values().cpu().contiguous().numpy(),
                )
                has_grad.append(False)
                continue
            if self._shipped.get(pid) != (grad.data_ptr(), grad._version):
                layout.view(flat, j).copy_(grad)
            has_grad.append(True)
        return flat, tuple(has_grad), sparse, touched

    def _changed_params(self, shard: int, params: list[torch.Tensor]) -> ParamUpdate | None:
        """The user's parameters of ``shard`` modified since shardopt last wrote them.

        Where the shard's master copy is mapped here they are written into it at once, and the
        update is returned only for the shard's replica (None without replicas).
        """
        changed = [
            j
            for j, pid in enumerate(self._shard_params[shard])
            if self._versions[pid] != (params[pid]._version, params[pid].data_ptr())
        ]
        if not changed:
            return None
        mapped = self._shm[shard]
        update = None
        if mapped is not None:
            layout = self._layouts[shard]
            for j in changed:
                pid = self._shard_params[shard][j]
                target = layout.view(mapped[0], j)
                if target.data_ptr() != params[pid].data_ptr():  # share_params: written
                    target.copy_(params[pid].detach())
        if mapped is None or self._replicas is not None:
            tensors = [params[self._shard_params[shard][j]].detach().cpu() for j in changed]
            layout = FlatLayout.for_tensors(tensors)
            update = ParamUpdate(tuple(changed), layout, to_numpy(layout.pack(tensors)))
        for j in changed:
            pid = self._shard_params[shard][j]
            self._record_version(pid, params[pid])
        return update

    def _record_version(self, pid: int, p: torch.Tensor) -> None:
        self._versions[pid] = (p._version, p.data_ptr())

    def _request_state(self, shard: int, param_ids: tuple[int, ...] | None = None) -> Any:
        """Asks a shard for its state: through a shared-memory file where it is on this node
        (one copy there, one here), else through Ray's object store."""
        method = "state" if self._shm[shard] is None else "state_in_shared_memory"
        return self._call(shard, method, param_ids)

    def _receive_state(self, ref: Any) -> dict[int, Any]:
        """A shard's optimizer state by global id, as fresh CPU tensors."""
        packed = ray_get(ref)
        if isinstance(packed, SharedTree):
            data = shm.attach(packed.path, packed.layout.nbytes)
            packed = PackedTree(packed.skeleton, packed.layout, data)
        return unpack_tree(packed)
