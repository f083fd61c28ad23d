"""The shard map: one owner for where each parameter lives and what the client knows of it.

Parameters have global ids in ``param_groups`` order. :class:`ShardMap` keeps, for every id,
its shard and slot (its position in the shard's flat buffers), each shard's layout, the version
counter and storage each user tensor had when shardopt last wrote or sent it (to notice in-place
edits), and which ids have optimizer state on their shards, in torch's insertion order. All of
it changes together, in :meth:`ShardMap.place`, so nothing is appended by hand elsewhere.

Talks to nothing: the backends ask it where things are and copy through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from shardopt.core.buffers import FlatLayout, readonly_tensor, to_numpy
from shardopt.core.plan import ShardPlan
from shardopt.core.records import ParamBlock


class ShardMap:
    """Which shard owns which parameter, where in its buffers, and what was last sent.

    Args:
        num_shards: the optimizer's shard count.
    """

    def __init__(self, num_shards: int) -> None:
        self.plan = ShardPlan.empty(num_shards)
        self._ids_of_shard: list[list[int]] = [[] for _ in range(num_shards)]
        self._slots: list[tuple[int, int]] = []  # global id -> (shard, slot)
        self._layouts = [FlatLayout.for_specs([]) for _ in range(num_shards)]
        self._ids_by_tensor: dict[int, int] = {}
        self._versions: list[tuple[int, int]] = []
        self._state_order: dict[int, None] = {}

    @classmethod
    def with_owners(
        cls, num_shards: int, owners: tuple[int, ...], params: list[torch.Tensor]
    ) -> ShardMap:
        """A map whose plan was made elsewhere (a gateway's), over ``params``."""
        shard_map = cls(num_shards)
        shard_map.adopt(owners, params)
        return shard_map

    def adopt(self, owners: tuple[int, ...], params: list[torch.Tensor]) -> None:
        """Appends parameters placed elsewhere (by a gateway): ids, owners and versions only
        (such a map moves no flat buffers, so it keeps no layouts)."""
        loads = list(self.plan.shard_bytes)
        for p, owner in zip(params, owners, strict=True):
            loads[owner] += p.numel() * p.element_size()
            self._slots.append((owner, len(self._ids_of_shard[owner])))
            self._ids_of_shard[owner].append(self.num_params - 1)
            self._adopt(p)
        self.plan = ShardPlan(owners=self.plan.owners + tuple(owners), shard_bytes=tuple(loads))

    # ----- where things are -----------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self.plan.num_shards

    @property
    def num_params(self) -> int:
        return len(self._slots)

    def ids_of(self, shard: int) -> list[int]:
        """The global ids of ``shard``'s parameters, in its slot order."""
        return self._ids_of_shard[shard]

    def live_shards(self) -> list[int]:
        """The shards that hold any parameter."""
        return [s for s in range(self.num_shards) if self._ids_of_shard[s]]

    def shard_of(self, pid: int) -> int:
        return self._slots[pid][0]

    def slot_of(self, pid: int) -> tuple[int, int]:
        """The shard of parameter ``pid`` and its slot there."""
        return self._slots[pid]

    def layout(self, shard: int) -> FlatLayout:
        return self._layouts[shard]

    def id_of(self, tensor: object) -> int | None:
        """The global id of one of the optimizer's parameters (None for any other object)."""
        return self._ids_by_tensor.get(id(tensor))

    # ----- placing parameters ---------------------------------------------------------------

    def _adopt(self, p: torch.Tensor) -> int:
        pid = len(self._versions)
        self._ids_by_tensor[id(p)] = pid
        self._versions.append((p._version, p.data_ptr()))
        return pid

    def place(self, new_params: list[torch.Tensor], groups: list[int]) -> list[ParamBlock]:
        """Assigns new parameters (appended after the existing ids) to shards.

        Returns:
            Each shard's block of new parameters with their initial values (possibly empty).
        """
        first = self.num_params
        self.plan = self.plan.extended([p.numel() * p.element_size() for p in new_params])
        self._slots.extend([(-1, -1)] * len(new_params))
        blocks = []
        for s in range(self.num_shards):
            picks = [j for j in range(len(new_params)) if self.plan.owners[first + j] == s]
            tensors = [new_params[j] for j in picks]
            layout = FlatLayout.for_tensors(tensors)
            blocks.append(
                ParamBlock(
                    param_ids=tuple(first + j for j in picks),
                    group_indices=tuple(groups[j] for j in picks),
                    layout=layout,
                    values=to_numpy(layout.pack([t.detach().cpu() for t in tensors])),
                )
            )
            base = len(self._ids_of_shard[s])
            for k, j in enumerate(picks):
                self._ids_of_shard[s].append(first + j)
                self._slots[first + j] = (s, base + k)
            self._layouts[s] = self._layouts[s].extended(list(zip(layout.shapes, layout.dtypes)))
        for p in new_params:
            self._adopt(p)
        return blocks

    def block_of(self, shard: int, params: list[torch.Tensor], groups: list[int]) -> ParamBlock:
        """``shard``'s parameters as they are now (to rebuild the shard elsewhere)."""
        ids = self._ids_of_shard[shard]
        tensors = [params[pid].detach().cpu() for pid in ids]
        layout = FlatLayout.for_tensors(tensors)
        return ParamBlock(
            param_ids=tuple(ids),
            group_indices=tuple(groups[pid] for pid in ids),
            layout=layout,
            values=to_numpy(layout.pack(tensors)),
        )

    # ----- what the client last sent or wrote -----------------------------------------------

    def record(self, pid: int, p: torch.Tensor) -> None:
        """Notes that ``p`` now holds what its shard holds."""
        self._versions[pid] = (p._version, p.data_ptr())

    def changed_slots(self, shard: int, params: list[torch.Tensor]) -> list[int]:
        """Slots of ``shard`` whose user tensor was changed in place since last recorded."""
        versions = self._versions
        return [
            j
            for j, pid in enumerate(self._ids_of_shard[shard])
            if versions[pid] != (params[pid]._version, params[pid].data_ptr())
        ]

    def any_changed(self, params: list[torch.Tensor]) -> bool:
        return any(
            v != (p._version, p.data_ptr()) for v, p in zip(self._versions, params, strict=True)
        )

    def forget_versions(self) -> None:
        """Treats every parameter as changed (after writes through ``.data``, which no version
        counter sees)."""
        self._versions = [(-1, -1)] * len(self._versions)

    @torch.no_grad()
    def copy_back(
        self,
        shard: int,
        values: torch.Tensor | Any,
        params: list[torch.Tensor],
        slots: Iterable[int] | None = None,
    ) -> None:
        """Copies ``shard``'s flat parameter buffer (a tensor, or a numpy array) into the user's
        tensors (all slots, or ``slots``), skipping tensors that already are views of it."""
        if not isinstance(values, torch.Tensor):
            values = readonly_tensor(values)
        layout = self._layouts[shard]
        ids = self._ids_of_shard[shard]
        for j in range(len(ids)) if slots is None else slots:
            pid = ids[j]
            p = params[pid]
            source = layout.view(values, j)
            if p.data_ptr() != source.data_ptr():  # share_params: already in place
                p.copy_(source)
            self._versions[pid] = (p._version, p.data_ptr())

    # ----- which parameters have optimizer state --------------------------------------------

    @property
    def state_order(self) -> list[int]:
        """Ids whose shard holds optimizer state for them, in torch's insertion order."""
        return list(self._state_order)

    def has_state(self, pid: int) -> bool:
        return pid in self._state_order

    def note_state(self, param_ids: Iterable[int]) -> None:
        """Adds ids that gained state (in increasing order, as torch meets them in a step)."""
        for pid in sorted(param_ids):
            self._state_order.setdefault(pid, None)

    def set_state_order(self, param_ids: Iterable[int]) -> None:
        """Replaces the order (after a load)."""
        self._state_order = dict.fromkeys(param_ids)
