"""The sharding plan: which shard holds which parameter, or which rows of it.

Tensors are placed with the greedy rule ZeroRedundancyOptimizer uses, largest (in bytes) first
onto the least-loaded shard, ties to the lower shard index and the lower parameter id, where a
shard's load is its bytes plus :data:`TENSOR_COST` for every tensor (or piece) it holds: a step
costs each tensor a fixed overhead beyond its bytes, so a shard of many small tensors is as slow
as one with more bytes in few (by bytes alone, a 2M-parameter model whose embedding is 40 % of
it had 1,918 of its 1,922 other tensors on one of its 2 shards). A tensor that may be
split (an element-wise algorithm's, with more than one row) and would leave the shard with the
fewest bytes more than :data:`SLACK` above the mean bytes is cut along dim 0 into row ranges:
the shards with the fewest bytes are filled up to the mean (to the nearest whole cut unit), one
contiguous range each, the last one takes the rest. So one big tensor no longer decides a
shard's bytes, and a shard holds at most one piece of a tensor. With ``tensor_cost=0`` the rule
is ZeroRedundancyOptimizer's by bytes exactly.
Whole-matrix algorithms (Adafactor, Muon) keep whole tensors (see
:func:`shardopt.core.param_groups.splits_by_default`).

Deterministic: the same parameters always give the same plan; parameters added later are placed
around the existing ones without moving them.

Talks to nothing; the client's shard map (:mod:`shardopt.client.shard_map`) asks it where new
parameters go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SLACK = 1.05
"""A tensor that would leave its shard at most this much above the mean bytes stays whole."""

TENSOR_COST = 8 << 10
"""What one more tensor costs a shard's step beyond its bytes, counted as bytes of parameters.

On a CPU shard torch's optimizers spend a few microseconds per tensor (``_init_group``'s
bookkeeping, one kernel call each), and the client some more on each tensor's copies: about
what a memory-bound AdamW step spends on 8 KiB of parameters (28 bytes of traffic per float32).
Measured (``benchmarks/step_bench.py --sizes 2M --layers 160 --configs local,shardopt --shards 2
--algos adamw --repeats 15``: 1,923 tensors, an embedding of 40 %): a step took 29.6-30.7 ms
placed by bytes alone, 23.1-24.5 ms with this cost (torch fused: 13.6-15.3 ms). Against the
megabytes of a large model's tensors it changes nothing (the 20M and 50M shapes of that
benchmark are placed as before).
"""


ALIGN = 128
"""Every cut between two pieces falls on a multiple of this many elements of the tensor.

torch's CPU kernels run vectorised over whole SIMD blocks (up to 64 elements) and finish the
last few elements of a tensor with scalar code, which may round differently (a fused
multiply-add in one, not in the other). Cutting only at multiples of ``ALIGN`` elements puts
every element of a piece in the same kind of block it is in within the whole tensor, so a split
tensor's numbers stay bit-identical to torch's.
"""


@dataclass(frozen=True)
class TensorSize:
    """What the plan needs to know of a tensor: its bytes, its rows (dim 0; 1 for a 0-dim
    tensor), its elements per row and whether it may be split into row ranges."""

    nbytes: int
    rows: int = 1
    splittable: bool = False
    row_numel: int = 1

    @property
    def row_align(self) -> int:
        """Rows per cut unit: cuts fall on multiples of this many rows (see :data:`ALIGN`)."""
        return ALIGN // math.gcd(ALIGN, max(self.row_numel, 1))

    @property
    def units(self) -> int:
        """How many cut units the tensor has (the last one may be short)."""
        return -(-self.rows // self.row_align)

    def rows_bytes(self, start: int, stop: int) -> int:
        """The bytes of rows ``[start, stop)`` (a piece's share of :attr:`nbytes`)."""
        return round((stop - start) * (self.nbytes / self.rows))


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of a parameter, held by ``shard`` (all rows: a whole tensor)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class RowRange:
    """Rows ``[start, stop)`` of a tensor of ``rows`` rows (a split parameter's piece as a shard
    holds it, and as a checkpoint writes and reads it)."""

    start: int
    stop: int
    rows: int


@dataclass(frozen=True)
class ShardPlan:
    """Where every parameter (by global id) lives, and the bytes each shard holds.

    ``pieces[pid]`` are the parameter's row ranges in row order, one per shard at most; a whole
    tensor is one piece.
    """

    pieces: tuple[tuple[Piece, ...], ...]
    shard_bytes: tuple[int, ...]

    @property
    def num_shards(self) -> int:
        return len(self.shard_bytes)

    @property
    def owners(self) -> tuple[int, ...]:
        """The shard of every parameter's first piece (its only one, when it is whole)."""
        return tuple(p[0].shard for p in self.pieces)

    def params_of(self, shard: int) -> list[int]:
        """Global ids with a piece on ``shard``, in increasing order."""
        return [pid for pid, ps in enumerate(self.pieces) if any(p.shard == shard for p in ps)]

    def is_split(self, pid: int) -> bool:
        return len(self.pieces[pid]) > 1

    @classmethod
    def empty(cls, num_shards: int) -> ShardPlan:
        if num_shards < 1:
            raise ValueError(f"Invalid num_shards: {num_shards} (must be >= 1)")
        return cls(pieces=(), shard_bytes=(0,) * num_shards)

    def extended(self, sizes: list[int | TensorSize], tensor_cost: int = TENSOR_COST) -> ShardPlan:
        """Places new parameters (appended after the existing ids) without moving old ones.

        Args:
            sizes: each new parameter's bytes (a whole tensor), or its :class:`TensorSize`.
            tensor_cost: what each tensor or piece adds to its shard's load beyond its bytes
                (0: balanced by bytes alone, ZeroRedundancyOptimizer's rule exactly).
        """
        sizes = [s if isinstance(s, TensorSize) else TensorSize(int(s)) for s in sizes]
        loads = list(self.shard_bytes)
        n = len(loads)
        costs = [loads[s] + tensor_cost * len(self.params_of(s)) for s in range(n)]
        mean = (sum(loads) + sum(s.nbytes for s in sizes)) / n
        placed: list[tuple[Piece, ...]] = [()] * len(sizes)
        order = sorted(range(len(sizes)), key=lambda i: (-sizes[i].nbytes, i))
        for i in order:
            size = sizes[i]
            fewest_bytes = min(range(n), key=lambda s: (loads[s], s))
            fits = loads[fewest_bytes] + size.nbytes <= mean * SLACK
            if fits or not size.splittable or size.units < 2 or n == 1:
                cheapest = min(range(n), key=lambda s: (costs[s], s))
                placed[i] = (Piece(cheapest, 0, size.rows),)
                loads[cheapest] += size.nbytes
                costs[cheapest] += size.nbytes + tensor_cost
                continue
            placed[i] = self._split(size, loads, mean)
            for piece in placed[i]:
                costs[piece.shard] += size.rows_bytes(piece.start, piece.stop) + tensor_cost
        return ShardPlan(pieces=self.pieces + tuple(placed), shard_bytes=tuple(loads))

    def with_pieces(
        self, sizes: list[int | TensorSize], pieces: tuple[tuple[Piece, ...], ...]
    ) -> ShardPlan:
        """Appends new parameters where ``pieces`` says they are (a layout recorded earlier,
        whatever rule made it), instead of placing them.

        Raises:
            ValueError: pieces that do not cover each parameter's rows in order, one shard
                each, on this plan's shards.
        """
        sizes = [s if isinstance(s, TensorSize) else TensorSize(int(s)) for s in sizes]
        if len(pieces) != len(sizes):
            raise ValueError(f"pieces for {len(pieces)} parameters, not {len(sizes)}")
        loads = list(self.shard_bytes)
        for pid, (size, ps) in enumerate(zip(sizes, pieces), start=len(self.pieces)):
            shards = [p.shard for p in ps]
            rows = [(p.start, p.stop) for p in ps]
            ends = [0] + [stop for _, stop in rows]
            if (
                not ps
                or len(set(shards)) != len(shards)
                or not all(0 <= shard < len(loads) for shard in shards)
                or [start for start, _ in rows] != ends[:-1]
                or ends[-1] != size.rows
                or (len(rows) > 1 and any(start >= stop for start, stop in rows))
            ):
                raise ValueError(f"parameter {pid}: pieces {ps} do not lay out {size.rows} rows")
            for p in ps:
                loads[p.shard] += size.nbytes if len(ps) == 1 else size.rows_bytes(p.start, p.stop)
        return ShardPlan(pieces=self.pieces + tuple(pieces), shard_bytes=tuple(loads))

    @staticmethod
    def _split(size: TensorSize, loads: list[int], mean: float) -> tuple[Piece, ...]:
        """Fills the least-loaded shards up to ``mean`` with row ranges of one tensor, cut at
        whole units of :attr:`TensorSize.row_align` rows."""
        align = size.row_align
        unit_bytes = size.nbytes / size.rows * align
        by_load = sorted(range(len(loads)), key=lambda s: (loads[s], s))
        cuts: list[tuple[int, int]] = []  # (shard, units)
        left = size.units
        for k, s in enumerate(by_load):
            if left == 0:
                break
            last = k == len(by_load) - 1
            room = round((mean - loads[s]) / unit_bytes) if not last else left
            units = min(left, max(room, 1 if not cuts else 0))
            if units == 0:
                continue
            cuts.append((s, units))
            left -= units
        if left:  # every shard was at the mean: the rest goes with the last piece
            s, units = cuts[-1]
            cuts[-1] = (s, units + left)
        pieces, start = [], 0
        for s, units in cuts:
            stop = min(start + units * align, size.rows)
            pieces.append(Piece(s, start, stop))
            loads[s] += size.rows_bytes(start, stop)
            start = stop
        return tuple(pieces)

    def describe(self) -> str:
        lines = [f"ShardPlan over {self.num_shards} shard(s):"]
        for s in range(self.num_shards):
            held = []
            for pid, ps in enumerate(self.pieces):
                for p in ps:
                    if p.shard == s:
                        held.append(f"{pid}[{p.start}:{p.stop}]" if len(ps) > 1 else str(pid))
            lines.append(f"  shard {s}: params [{', '.join(held)}], {self.shard_bytes[s]} bytes")
        return "\n".join(lines)
