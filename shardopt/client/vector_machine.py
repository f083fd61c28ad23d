"""The client side of sharded flat vectors: named vectors whose slices live on the shards.

LBFGS treats all parameters as one flat vector. A :class:`ShardedVector` is such a vector with
each shard holding its slice under the vector's name (in the shard's
:class:`~shardopt.actor.vectors.VectorStore`); the :class:`VectorMachine` queues elementwise
operations on them and sends them with the next reduction, one round trip per shard, and
combines the shards' partial dot products and norms.

Talks to: the shards' vector stores through :meth:`ShardHandle.run_vectors
<shardopt.client.handles.ShardHandle.run_vectors>`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get


class VectorMachine:
    """Client side of the named vectors: queues operations, runs them, combines reductions."""

    def __init__(self, handles: list[ShardHandle]):
        self._handles = handles
        self.shards = [h.index for h in handles]
        self._programs: dict[int, list[tuple]] = {s: [] for s in self.shards}
        self._next_name = 0
        self._garbage: list[str] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.round_trips = 0

    def new(self) -> ShardedVector:
        self._next_name += 1
        return ShardedVector(self, f"v{self._next_name - 1}")

    def portable(self) -> dict[str, Any]:
        """Where its naming stands (the next name's number) and the names it has yet to free,
        as plain values: what a machine taking over the same shards needs (:meth:`adopt`)."""
        return {"next": self._next_name, "garbage": list(self._garbage)}

    def adopt(self, portable: dict[str, Any]) -> None:
        """Takes over from the machine whose :meth:`portable` this is (on the same shards):
        new names follow its last, and its garbage is freed with the next flush."""
        self._next_name = max(self._next_name, int(portable["next"]))
        self._garbage.extend(str(name) for name in portable["garbage"])

    def queue(self, op: tuple) -> None:
        for program in self._programs.values():
            program.append(op)

    def queue_each(self, ops: dict[int, tuple]) -> None:
        for s, op in ops.items():
            self._programs[s].append(op)

    def derive(self, op: str, *args: Any) -> ShardedVector:
        out = self.new()
        self.queue((op, out.name, *args))
        return out

    def derive_params(self) -> ShardedVector:
        """A vector holding a copy of the current parameters (torch's ``_clone_param``)."""
        out = self.new()
        self.queue(("param_save", out.name))
        return out

    def release(self, name: str) -> None:
        self._garbage.append(name)

    def flush(self, tail: tuple | None = None) -> list[list[Any]]:
        """Sends every queued operation (and ``tail``); returns each shard's results."""
        if tail is not None:
            self.queue(tail)
        if self._garbage:
            # Last: a queued operation may still read a vector released since it was queued.
            garbage, self._garbage = self._garbage, []
            for program in self._programs.values():
                program.append(("free", *garbage))
        programs, self._programs = self._programs, {s: [] for s in self.shards}
        for program in programs.values():
            self.bytes_sent += sum(
                a.nbytes for op in program for a in op if isinstance(a, np.ndarray)
            )
        results = ray_get([h.run_vectors(programs[h.index]) for h in self._handles])
        self.round_trips += 1
        for shard_results in results:
            self.bytes_received += sum(r.nbytes for r in shard_results if isinstance(r, np.ndarray))
        return results

    def reduce(self, kind: str, *names: str) -> torch.Tensor:
        parts = [r[-1] for r in self.flush((kind, *names))]  # "free" returns nothing
        if len(parts) == 1:
            return parts[0]
        stacked = torch.stack(parts)
        return stacked.max() if kind == "absmax" else stacked.sum()


class ShardedVector:
    """A flat vector over all parameters, each shard holding its slice under ``name``.

    Supports the tensor methods LBFGS and torch's ``_strong_wolfe`` use: ``dot``, ``abs().max()``,
    ``abs().sum()``, ``neg``, ``sub``, ``mul``, ``clone``, ``copy_`` and ``add_``.
    """

    __slots__ = ("_machine", "name")

    def __init__(self, machine: VectorMachine, name: str):
        self._machine = machine
        self.name = name

    def dot(self, other: ShardedVector) -> torch.Tensor:
        return self._machine.reduce("dot", self.name, other.name)

    def abs(self) -> _AbsVector:
        return _AbsVector(self)

    def neg(self) -> ShardedVector:
        return self._machine.derive("neg", self.name)

    def sub(self, other: ShardedVector) -> ShardedVector:
        return self._machine.derive("sub", self.name, other.name)

    def mul(self, scalar: Any) -> ShardedVector:
        return self._machine.derive("mul", self.name, scalar)

    def clone(self, memory_format: Any = None) -> ShardedVector:
        return self._machine.derive("clone", self.name)

    def copy_(self, other: ShardedVector) -> ShardedVector:
        self._machine.queue(("copy_", self.name, other.name))
        return self

    def add_(self, other: ShardedVector, alpha: Any = 1) -> ShardedVector:
        self._machine.queue(("add_", self.name, other.name, alpha))
        return self

    def __del__(self) -> None:
        self._machine.release(self.name)


class _AbsVector:
    __slots__ = ("_vector",)

    def __init__(self, vector: ShardedVector):
        self._vector = vector

    def max(self) -> torch.Tensor:
        return self._vector._machine.reduce("absmax", self._vector.name)

    def sum(self) -> torch.Tensor:
        return self._vector._machine.reduce("abssum", self._vector.name)
