"""The shard map: one owner for where each parameter lives and what the client knows of it.

Parameters have global ids in ``param_groups`` order. A parameter lives whole on one shard, or
split along dim 0 into row ranges on several (one piece per shard at most; see
:mod:`shardopt.core.plan`). :class:`ShardMap` keeps, for every piece, its shard and slot (its
position in the shard's flat buffers) and rows; each shard's layout; the version counter and
storage each user tensor had when shardopt last wrote or sent each piece (to notice in-place
edits); and which ids have optimizer state on their shards, in torch's insertion order. All of
it changes together, in :meth:`ShardMap.place`, so nothing is appended by hand elsewhere.

It also turns a split parameter's per-piece optimizer state into torch's whole tensors and back
(:meth:`merge_piece`, :meth:`split_state`): state tensors shaped like the piece are its rows of
the whole state; everything else (``step``, scalars) is the same on every piece.

Talks to nothing: the backends ask it where things are and copy through it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from shardopt.core.buffers import FlatLayout, readonly_tensor, to_numpy
from shardopt.core.param_groups import unfused_groups
from shardopt.core.plan import Piece, RowRange, ShardPlan, TensorSize
from shardopt.core.records import ParamBlock, StateNews


@dataclass(frozen=True)
class Slot:
    """One piece of a parameter in one shard's buffers: the parameter, its rows (``None``:
    the whole tensor) and the parameter's row count."""

    pid: int
    rows: tuple[int, int] | None
    full_rows: int


def _rows_of(p: torch.Tensor) -> int:
    return p.shape[0] if p.dim() else 1


class ShardMap:
    """Which shard holds which parameter (or rows of it), where in its buffers, and what was
    last sent.

    Args:
        num_shards: the optimizer's shard count.
    """

    def __init__(self, num_shards: int) -> None:
        self.plan = ShardPlan.empty(num_shards)
        self._slots: list[list[Slot]] = [[] for _ in range(num_shards)]
        self._where: list[list[tuple[int, int]]] = []  # global id -> [(shard, slot)] in row order
        self._layouts = [FlatLayout.for_specs([]) for _ in range(num_shards)]
        self._ids_by_tensor: dict[int, int] = {}
        self._versions: list[list[tuple[int, int]]] = [[] for _ in range(num_shards)]
        self._state_order: dict[int, None] = {}
        self._state_seen: dict[int, tuple[int, int]] = {}  # shard -> its last StateNews' mark

    @classmethod
    def with_owners(
        cls, num_shards: int, owners: tuple[int, ...], params: list[torch.Tensor]
    ) -> ShardMap:
        """A map whose plan was made elsewhere (a gateway's), over ``params``."""
        shard_map = cls(num_shards)
        shard_map.adopt(owners, params)
        return shard_map

    def adopt(self, owners: tuple[int, ...], params: list[torch.Tensor]) -> None:
        """Appends parameters placed elsewhere (by a gateway), each by the shard of its first
        piece: ids and versions only (such a map moves no flat buffers, so it keeps no
        layouts)."""
        loads = list(self.plan.shard_bytes)
        pieces = []
        for p, owner in zip(params, owners, strict=True):
            loads[owner] += p.numel() * p.element_size()
            pieces.append((Piece(owner, 0, _rows_of(p)),))
            self._add_slot(owner, self.num_params, None, _rows_of(p), p)
            self._ids_by_tensor[id(p)] = self.num_params - 1
        self.plan = ShardPlan(pieces=self.plan.pieces + tuple(pieces), shard_bytes=tuple(loads))

    def _add_slot(
        self, shard: int, pid: int, rows: tuple[int, int] | None, full_rows: int, p: torch.Tensor
    ) -> None:
        if pid == len(self._where):
            self._where.append([])
        self._where[pid].append((shard, len(self._slots[shard])))
        self._slots[shard].append(Slot(pid, rows, full_rows))
        self._versions[shard].append((p._version, p.data_ptr()))

    # ----- where things are -----------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self.plan.num_shards

    @property
    def num_params(self) -> int:
        return len(self._where)

    def ids_of(self, shard: int) -> list[int]:
        """The global ids with a piece on ``shard``, in its slot order."""
        return [slot.pid for slot in self._slots[shard]]

    def slots(self, shard: int) -> list[Slot]:
        return self._slots[shard]

    def live_shards(self) -> list[int]:
        """The shards that hold any parameter."""
        return [s for s in range(self.num_shards) if self._slots[s]]

    def shards_of(self, pid: int) -> list[int]:
        """The shards holding parameter ``pid`` (several when it is split), in row order."""
        return [shard for shard, _ in self._where[pid]]

    def pieces_of(self, pid: int) -> list[tuple[int, int]]:
        """The (shard, slot) of every piece of parameter ``pid``, in row order."""
        return self._where[pid]

    def is_split(self, pid: int) -> bool:
        return len(self._where[pid]) > 1

    def layout(self, shard: int) -> FlatLayout:
        return self._layouts[shard]

    def id_of(self, tensor: object) -> int | None:
        """The global id of one of the optimizer's parameters (None for any other object)."""
        return self._ids_by_tensor.get(id(tensor))

    def row_ranges(self, shard: int) -> dict[int, RowRange]:
        """The rows ``shard`` holds of each parameter split across shards, by global id."""
        return {
            slot.pid: RowRange(slot.rows[0], slot.rows[1], slot.full_rows)
            for slot in self._slots[shard]
            if slot.rows is not None
        }

    def rows_of(self, pid: int, shard: int) -> tuple[int, int, int] | None:
        """(start, stop, rows of the whole) of the piece of parameter ``pid`` on ``shard``;
        None when ``pid`` is whole there."""
        for s, j in self._where[pid]:
            slot = self._slots[s][j]
            if s == shard and slot.rows is not None:
                return slot.rows[0], slot.rows[1], slot.full_rows
        return None

    def is_piece_shaped(self, pid: int, shard: int, shape: tuple[int, ...]) -> bool:
        """Whether a state tensor of ``shape`` is shaped like parameter ``pid``'s piece on
        ``shard`` (so it holds that piece's rows of a whole state tensor)."""
        k = self.shards_of(pid).index(shard)
        piece = self._layouts[shard].shapes[self._where[pid][k][1]]
        return len(shape) > 0 and tuple(shape) == tuple(piece)

    def piece(self, shard: int, slot: int, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a parameter or its gradient) as the piece in ``shard``'s ``slot``."""
        rows = self._slots[shard][slot].rows
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    # ----- placing parameters ---------------------------------------------------------------

    def place(
        self,
        new_params: list[torch.Tensor],
        groups: list[int],
        splittable: list[bool],
        pieces: tuple[tuple[Piece, ...], ...] | None = None,
    ) -> list[ParamBlock]:
        """Assigns new parameters (appended after the existing ids) to shards, splitting the
        ``splittable`` ones into row ranges where that balances the shards, or where ``pieces``
        says they are (a resumed session's recorded layout).

        Returns:
            Each shard's block of new pieces with their initial values (possibly empty).
        """
        first = self.num_params
        sizes = [
            TensorSize(
                p.numel() * p.element_size(),
                _rows_of(p),
                split and p.dim() > 0,
                p.numel() // p.shape[0] if p.dim() and p.shape[0] else 1,
            )
            for p, split in zip(new_params, splittable, strict=True)
        ]
        if pieces is None:
            self.plan = self.plan.extended(sizes)
        else:
            self.plan = self.plan.with_pieces(sizes, pieces)
        per_shard: list[list[tuple[int, Piece]]] = [[] for _ in range(self.num_shards)]
        for j, placed in enumerate(self.plan.pieces[first:]):
            for piece in placed:
                per_shard[piece.shard].append((j, piece))
        for j, p in enumerate(new_params):
            self._ids_by_tensor[id(p)] = first + j
        self._where.extend([] for _ in new_params)
        unfused = unfused_groups(new_params, groups)
        blocks = []
        for s in range(self.num_shards):
            picks = sorted(per_shard[s], key=lambda jp: jp[0])
            tensors, rows = [], []
            for j, piece in picks:
                p, full = new_params[j], sizes[j].rows
                whole = piece.start == 0 and piece.stop == full
                rows.append(None if whole else (piece.start, full))
                tensors.append(p if whole else p[piece.start : piece.stop])
                span = None if whole else (piece.start, piece.stop)
                self._where[first + j].append((s, len(self._slots[s])))
                self._slots[s].append(Slot(first + j, span, full))
                self._versions[s].append((p._version, p.data_ptr()))
            layout = FlatLayout.for_tensors(tensors)
            blocks.append(
                ParamBlock(
                    param_ids=tuple(first + j for j, _ in picks),
                    group_indices=tuple(groups[j] for j, _ in picks),
                    layout=layout,
                    values=to_numpy(layout.pack([t.detach().cpu() for t in tensors])),
                    rows=tuple(rows) if any(r is not None for r in rows) else (),
                    unfused_groups=unfused,
                )
            )
            self._layouts[s] = self._layouts[s].extended(list(zip(layout.shapes, layout.dtypes)))
        for pid in range(first, self.num_params):  # row order: sorted by first row
            self._where[pid].sort(key=lambda ss: self._start(*ss))
        return blocks

    def _start(self, shard: int, slot: int) -> int:
        rows = self._slots[shard][slot].rows
        return 0 if rows is None else rows[0]

    def block_of(self, shard: int, params: list[torch.Tensor], groups: list[int]) -> ParamBlock:
        """``shard``'s pieces as they are now (to rebuild the shard elsewhere)."""
        slots = self._slots[shard]
        tensors = [
            self.piece(shard, j, params[slot.pid]).detach().cpu() for j, slot in enumerate(slots)
        ]
        layout = FlatLayout.for_tensors(tensors)
        rows = [None if slot.rows is None else (slot.rows[0], slot.full_rows) for slot in slots]
        return ParamBlock(
            param_ids=tuple(slot.pid for slot in slots),
            group_indices=tuple(groups[slot.pid] for slot in slots),
            layout=layout,
            values=to_numpy(layout.pack(tensors)),
            rows=tuple(rows) if any(r is not None for r in rows) else (),
            unfused_groups=unfused_groups(params, groups),
        )

    # ----- what the client last sent or wrote -----------------------------------------------

    def record(self, pid: int, p: torch.Tensor) -> None:
        """Notes that ``p`` now holds what its shards hold (every piece)."""
        now = (p._version, p.data_ptr())
        for shard, slot in self._where[pid]:
            self._versions[shard][slot] = now

    def record_slot(self, shard: int, slot: int, p: torch.Tensor) -> None:
        """Notes that shard ``shard`` now holds ``p``'s rows of ``slot``."""
        self._versions[shard][slot] = (p._version, p.data_ptr())

    def changed_slots(self, shard: int, params: list[torch.Tensor]) -> list[int]:
        """Slots of ``shard`` whose user tensor was changed in place since last recorded."""
        versions = self._versions[shard]
        changed = []
        for j, slot in enumerate(self._slots[shard]):
            p = params[slot.pid]
            if versions[j] != (p._version, p.data_ptr()):
                changed.append(j)
        return changed

    def any_changed(self, params: list[torch.Tensor]) -> bool:
        return any(self.changed_slots(s, params) for s in range(self.num_shards))

    def forget_versions(self) -> None:
        """Treats every parameter as changed (after writes through ``.data``, which no version
        counter sees)."""
        self._versions = [[(-1, -1)] * len(v) for v in self._versions]

    @torch.no_grad()
    def copy_back(
        self,
        shard: int,
        values: torch.Tensor | Any,
        params: list[torch.Tensor],
        slots: Iterable[int] | None = None,
        rows: dict[int, Any] | None = None,
        views: list[torch.Tensor] | None = None,
    ) -> None:
        """Copies ``shard``'s flat parameter buffer (a tensor, or a numpy array) into the user's
        tensors (all slots, or ``slots``), skipping tensors that already are views of it.

        Args:
            rows: by slot, the only rows to copy (those a sparse gradient touched).
            views: the typed views of each tensor in ``values``, where the caller keeps them.
        """
        if not isinstance(values, torch.Tensor):
            values = readonly_tensor(values)
        layout = self._layouts[shard]
        rows = rows or {}
        targets, sources, written = [], [], []
        for j in range(len(self._slots[shard])) if slots is None else slots:
            pid = self._slots[shard][j].pid
            p = params[pid]
            source = layout.view(values, j) if views is None else views[j]
            target = self.piece(shard, j, p)
            if target.data_ptr() == source.data_ptr():  # share_params: already in place
                pass
            elif j in rows:
                index = torch.as_tensor(rows[j], device=target.device)
                target.index_copy_(0, index, source[torch.as_tensor(rows[j])].to(target.device))
            else:
                targets.append(target)
                sources.append(source)
            written.append(pid)
        if targets:  # one call: a copy_ each from Python costs more than a small tensor's copy
            torch._foreach_copy_(targets, sources)
        for pid in written:  # later pieces' copies bump it again, and record again
            self.record(pid, params[pid])

    @torch.no_grad()
    def copy_rows(
        self, shard: int, rows: dict[int, Any], values: dict[int, Any], params: list[torch.Tensor]
    ) -> None:
        """Writes the new values of some rows (``values[slot]``, for the row indices
        ``rows[slot]`` of the slot's piece) into the user's tensors: a sparse step's result."""
        for j, changed in values.items():
            pid = self._slots[shard][j].pid
            p = params[pid]
            target = self.piece(shard, j, p)
            index = torch.as_tensor(rows[j], device=target.device)
            target.index_copy_(0, index, readonly_tensor(changed).to(target.device))
            self.record(pid, p)

    # ----- a split parameter's optimizer state ----------------------------------------------

    def merge_piece(
        self, pid: int, shard: int, piece: dict[str, Any], merged: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Adds the state of parameter ``pid``'s piece on ``shard`` to its state in torch's
        form: tensors shaped like the piece are that piece's rows of whole tensors (allocated
        with the first piece to arrive, so no piece is held twice); the rest is the same on
        every piece.

        Args:
            merged: what the pieces so far gave (None for the first one).
        """
        k = self.shards_of(pid).index(shard)
        slot = self._slots[shard][self._where[pid][k][1]]
        if slot.rows is None:
            return piece
        start, stop = slot.rows
        rows = {
            key
            for key, value in piece.items()
            if isinstance(value, torch.Tensor) and self.is_piece_shaped(pid, shard, value.shape)
        }
        if merged is None:
            merged = {
                key: torch.empty((slot.full_rows, *value.shape[1:]), dtype=value.dtype)
                if key in rows
                else value
                for key, value in piece.items()
            }
        for key in rows:
            merged[key][start:stop].copy_(piece[key])
        return merged

    def split_state(self, pid: int, value: dict[str, Any], shape: torch.Size) -> dict[int, Any]:
        """The state ``value`` of parameter ``pid`` (of ``shape``), cut into its pieces' states
        by shard: tensors shaped like the parameter give each piece its rows; the rest goes to
        every piece as it is."""
        where = self._where[pid]
        if len(where) == 1:
            return {where[0][0]: value}
        split: dict[int, Any] = {}
        for shard, slot in where:
            start, stop = self._slots[shard][slot].rows
            split[shard] = {
                key: v[start:stop]
                if isinstance(v, torch.Tensor) and v.dim() and tuple(v.shape) == tuple(shape)
                else v
                for key, v in value.items()
            }
        return split

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

    def forget_state(self, pid: int) -> None:
        """Removes an id whose state was dropped (it comes last once it has state again)."""
        self._state_order.pop(pid, None)

    def state_seen(self, shard: int) -> tuple[int, int] | None:
        """The mark of the last :class:`StateNews` of ``shard`` (a group push sends it)."""
        return self._state_seen.get(shard)

    def learn_state(self, news: dict[int, StateNews | None]) -> None:
        """Follows the shards' news of which parameters have state (by shard): the ids gained
        since the mark last learnt, or a shard's whole list where state was dropped or replaced
        meanwhile (by any of a group's workers)."""
        added: list[int] = []
        whole: dict[int, tuple[int, ...]] = {}
        for s, n in news.items():
            if n is None:
                continue
            self._state_seen[s] = n.mark
            if n.whole:
                whole[s] = n.ids
            else:
                added.extend(n.ids)
        if whole:
            self._reconcile_state(whole)
        self.note_state(added)

    def _reconcile_state(self, whole: dict[int, tuple[int, ...]]) -> None:
        """Takes every id with state on some shards (``whole``: shard -> its ids) as the truth
        for those shards: an id they hold that is not among them lost its state (elsewhere: a
        load, a deletion), one among them that is not known gained it: those come last, each
        shard's in the order they gained it there, interleaved by id as a step meets them
        (shards' lists merged by their heads); the others keep their place."""
        holding = {pid for ids in whole.values() for pid in ids}
        order = dict.fromkeys(
            pid
            for pid in self._state_order
            if pid in holding or not any(s in whole for s in self.shards_of(pid))
        )
        gained = ([pid for pid in ids if pid not in order] for _, ids in sorted(whole.items()))
        for pid in heapq.merge(*gained):
            order.setdefault(pid, None)
        self._state_order = order

    def set_state_order(self, param_ids: Iterable[int]) -> None:
        """Replaces the order (after a load)."""
        self._state_order = dict.fromkeys(param_ids)
