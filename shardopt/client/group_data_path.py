"""A group worker's data path: a :class:`~shardopt.client.data_path.DataPath` that also maps the
worker's shared buffers on the group shards of its node.

Where a group shard is on this worker's node, the worker maps its
:class:`~shardopt.core.records.RankBuffers` (:meth:`GroupShardHost.attach_shared
<shardopt.actor.shard_group_host.GroupShardHost.attach_shared>`): its gradients are packed
straight into its slot there (and pushed without them), and the parameters a push answers
with are read in shared memory, from the shard's own buffer: in sync mode as they are (with
``share_params`` the worker's CPU parameters are re-pointed into it: nothing is copied back at
all), in async mode under the shard's :class:`~shardopt.core.read_gate.ReadGate`
(:meth:`GroupDataPath.read_gate`), as other ranks' pushes change it meanwhile; with
``share_params`` in async mode, from a buffer of the rank's own that the shard fills when it
answers.
The other shards go through Ray's object store as before. The shard's parameter buffer is not
handed to ``DataPath``'s own mapping: a user's edit of a parameter still reaches the shard as
an update under its lock.

Talks to: :mod:`shardopt.core.shm`, :mod:`shardopt.core.read_gate`; the rest as
:class:`~shardopt.client.data_path.DataPath`.
"""

from __future__ import annotations

import torch

from shardopt.client.data_path import DataPath, share_params_into
from shardopt.client.shard_map import ShardMap
from shardopt.core import shm
from shardopt.core.read_gate import ReadGate
from shardopt.core.records import RankBuffers


class GroupDataPath(DataPath):
    """A :class:`DataPath` with a group rank's gradient slots and shared parameter buffers."""

    def __init__(self, shard_map: ShardMap, *, share_params: bool = False) -> None:
        super().__init__(shard_map, share_params=False, replicated=False)
        self._group_map = shard_map
        self._share_group_params = share_params
        self._slots: dict[int, torch.Tensor] = {}
        self._group_params: dict[int, torch.Tensor] = {}
        self._gates: dict[int, ReadGate] = {}

    @property
    def shares_params(self) -> bool:
        """Whether the CPU parameters are re-pointed into the buffers this rank reads."""
        return self._share_group_params

    def map_rank(self, shard: int, buffers: RankBuffers | None, params: list[torch.Tensor]) -> None:
        """Maps this rank's buffers on ``shard`` (None: it has none) and unlinks their files;
        with ``share_params``, re-points the CPU parameters (whole tensors) into the shard's."""
        self._slots.pop(shard, None)
        self._group_params.pop(shard, None)
        gate = self._gates.pop(shard, None)
        if gate is not None:
            gate.close()
        self._forget_views(shard)
        self.forget_shipped(shard)
        if buffers is None:
            return
        if buffers.gate_path is not None:
            self._gates[shard] = ReadGate.open(buffers.gate_path)
        if buffers.param_path is not None:
            mapped = self._group_params[shard] = shm.attach(buffers.param_path, buffers.nbytes)
            if self._share_group_params:
                share_params_into(mapped, self._group_map, shard, params)
        self._slots[shard] = shm.attach(buffers.grad_path, buffers.nbytes)

    def in_slot(self, shard: int) -> bool:
        """Whether gradients for ``shard`` are packed into this rank's shared slot."""
        return shard in self._slots

    def group_params(self, shard: int) -> torch.Tensor | None:
        """The shard's parameter buffer, mapped here (None: its parameters come by Ray)."""
        return self._group_params.get(shard)

    def read_gate(self, shard: int) -> ReadGate | None:
        """The gate to copy the shard's parameter buffer under (None: it changes only while
        this rank waits for its answer)."""
        return self._gates.get(shard)

    def grad_buffer(self, shard: int) -> torch.Tensor:
        slot = self._slots.get(shard)
        return slot if slot is not None else super().grad_buffer(shard)

    def close(self) -> None:
        super().close()
        self._slots.clear()
        self._group_params.clear()
        for gate in self._gates.values():
            gate.close()
        self._gates.clear()
