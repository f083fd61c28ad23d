"""The sharding plan: which shard owns which parameter.

Whole tensors per shard (never split, so per-tensor algorithms such as Adafactor and Muon keep
torch's exact meaning), balanced by bytes with the greedy rule ZeroRedundancyOptimizer uses:
largest tensor first onto the least-loaded shard, ties to the lower shard index and the lower
parameter id. Deterministic: the same parameters always give the same plan.

Talks to nothing; the client's shard map (:mod:`shardopt.client.shard_map`) asks it where new
parameters go.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    """The owner shard of every parameter (by global id) and the bytes each shard holds."""

    owners: tuple[int, ...]
    shard_bytes: tuple[int, ...]

    @property
    def num_shards(self) -> int:
        return len(self.shard_bytes)

    def params_of(self, shard: int) -> list[int]:
        """Global ids owned by ``shard``, in increasing order."""
        return [pid for pid, owner in enumerate(self.owners) if owner == shard]

    @classmethod
    def empty(cls, num_shards: int) -> ShardPlan:
        if num_shards < 1:
            raise ValueError(f"Invalid num_shards: {num_shards} (must be >= 1)")
        return cls(owners=(), shard_bytes=(0,) * num_shards)

    def extended(self, param_bytes: list[int]) -> ShardPlan:
        """Places new parameters (appended after the existing ids) without moving old ones."""
        loads = list(self.shard_bytes)
        owners = [0] * len(param_bytes)
        order = sorted(range(len(param_bytes)), key=lambda i: (-param_bytes[i], i))
        for i in order:
            shard = min(range(len(loads)), key=lambda s: (loads[s], s))
            owners[i] = shard
            loads[shard] += param_bytes[i]
        return ShardPlan(owners=self.owners + tuple(owners), shard_bytes=tuple(loads))

    def describe(self) -> str:
        lines = [f"ShardPlan over {self.num_shards} shard(s):"]
        for s in range(self.num_shards):
            lines.append(f"  shard {s}: params {self.params_of(s)}, {self.shard_bytes[s]} bytes")
        return "\n".join(lines)
