"""Named flat vectors over one shard's parameters: the shard side of sharded LBFGS.

LBFGS treats all parameters as one flat vector. Sharded, each shard keeps its slice of every
such vector (direction, flat gradient, the s/y history) under a name, runs the elementwise
operations locally and returns only partial reductions (dot products, sums, maxima), which the
proxy combines. A *program* is a list of operations run in order in one call, so a chain of
elementwise updates followed by one reduction costs one round trip.

Talks to nothing: a :class:`~shardopt.actor.shard.Shard` owns a store (through the narrow
:class:`VectorHost` face) and runs the programs the proxy sends.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from shardopt.core.buffers import FlatLayout, readonly_tensor
from shardopt.core.records import ParamUpdate


class VectorHost(Protocol):
    """What a store needs of its shard."""

    @property
    def params(self) -> list[torch.Tensor]:
        """The master parameters, in local order (the list only grows)."""

    @property
    def layout(self) -> FlatLayout: ...

    def param_values(self) -> Any: ...

    def set_params(self, update: ParamUpdate) -> None: ...


class VectorStore:
    """The named slices held by one shard, over its parameters in local order."""

    def __init__(self, shard: VectorHost):
        self._shard = shard
        self._params = shard.params
        self._vectors: dict[str, torch.Tensor] = {}

    def _gather_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _load_grads(self, dst: str, grads: Any, has_grad: tuple[bool, ...]) -> None:
        """dst = the flat gradient, zeros where a parameter has none (torch's _gather_flat_grad)."""
        layout = self._shard.layout
        source = readonly_tensor(grads)
        device = self._params[0].device if self._params else torch.device("cpu")
        views = [
            layout.view(source, i).to(device).reshape(-1) if present else p.new_zeros(p.numel())
            for i, (p, present) in enumerate(zip(self._params, has_grad))
        ]
        self._vectors[dst] = torch.cat(views)

    def _add_to_params(self, step: Any, direction: str) -> None:
        update, offset = self._vectors[direction], 0
        for p in self._params:
            numel = p.numel()
            p.add_(update[offset : offset + numel].view_as(p), alpha=step)
            offset += numel

    def _set_params(self, source: str) -> None:
        values, offset = self._vectors[source], 0
        for p in self._params:
            numel = p.numel()
            p.copy_(values[offset : offset + numel].view_as(p))
            offset += numel

    @torch.no_grad()
    def run(self, program: list[tuple]) -> list[Any]:
        """Runs ``program``; returns the results of its reductions and reads, in order."""
        v = self._vectors
        results: list[Any] = []
        for op, *args in program:
            if op == "grad_in":
                self._load_grads(*args)
            elif op == "neg":
                v[args[0]] = v[args[1]].neg()
            elif op == "sub":
                v[args[0]] = v[args[1]].sub(v[args[2]])
            elif op == "mul":
                v[args[0]] = v[args[1]].mul(args[2])
            elif op == "clone":
                v[args[0]] = v[args[1]].clone(memory_format=torch.contiguous_format)
            elif op == "copy_":
                v[args[0]].copy_(v[args[1]])
            elif op == "add_":
                v[args[0]].add_(v[args[1]], alpha=args[2])
            elif op == "free":
                for name in args:
                    v.pop(name, None)
            elif op == "param_add":
                self._add_to_params(args[0], args[1])
            elif op == "param_save":
                v[args[0]] = self._gather_params().clone()
            elif op == "set_params_update":
                self._shard.set_params(args[0])
            elif op == "param_load":
                self._set_params(args[0])
            elif op == "put":
                v[args[0]] = readonly_tensor(args[1]).to(self._params[0].device, copy=True)
            elif op == "dot":
                results.append(v[args[0]].dot(v[args[1]]).cpu())
            elif op == "absmax":
                results.append(v[args[0]].abs().max().cpu())
            elif op == "abssum":
                results.append(v[args[0]].abs().sum().cpu())
            elif op == "read":
                results.append(v[args[0]].detach().cpu().numpy())
            elif op == "params_out":
                results.append(self._shard.param_values())
            else:
                raise ValueError(f"unknown vector operation {op!r}")
        return results
