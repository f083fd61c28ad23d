"""The proxy's ``optimizer.state``: a live, read-through view of the state held by the shards.

torch code reads ``opt.state[p]`` (and DCP checks ``if not opt.state``), Lightning writes it back
when moving state between devices. The view keeps only the keys on the client (which parameters
have state, in torch's insertion order); values are fetched from the owning shard on access and
written back to it on assignment. Nothing is cached, so it never goes stale.

Talks to: the proxy (:class:`shardopt.optimizer.ShardedOptimizer`), which talks to the shards.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from shardopt.optimizer import ShardedOptimizer


class ShardStateView(MutableMapping):
    """``{param: state dict}`` for the parameters whose shard holds optimizer state."""

    def __init__(self, optimizer: ShardedOptimizer):
        self._optimizer = weakref.ref(optimizer)

    @property
    def _opt(self) -> ShardedOptimizer:
        opt = self._optimizer()
        if opt is None:
            raise ReferenceError("the optimizer of this state view no longer exists")
        return opt

    def __len__(self) -> int:
        return len(self._opt._state_order)

    def __iter__(self) -> Iterator[torch.Tensor]:
        params = self._opt._flat_params()
        return iter([params[pid] for pid in self._opt._state_order])

    def __contains__(self, param: object) -> bool:
        pid = self._opt._param_id(param)
        return pid is not None and pid in self._opt._state_order

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        """A copy of ``param``'s state from its shard; ``{}`` when it has none (as defaultdict)."""
        pid = self._opt._param_id(param)
        if pid is None:
            raise KeyError(param)
        if pid not in self._opt._state_order:
            return {}
        return self._opt._fetch_param_state(pid)

    def __setitem__(self, param: torch.Tensor, value: dict[str, Any]) -> None:
        pid = self._opt._param_id(param)
        if pid is None:
            raise KeyError("only parameters of this optimizer can have optimizer state")
        self._opt._store_param_state(pid, value)

    def __delitem__(self, param: torch.Tensor) -> None:
        raise TypeError("shardopt does not support deleting a parameter's optimizer state")

    def __repr__(self) -> str:
        return f"ShardStateView({len(self)} parameters with state)"
