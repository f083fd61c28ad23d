"""The proxy's ``optimizer.state``: a live, read-through view of the state held by the shards.

torch code reads ``opt.state[p]`` (and DCP checks ``if not opt.state``), Lightning writes it back
when moving state between devices. The view keeps only the keys on the client (which parameters
have state, in torch's insertion order); values are fetched from the owning shard on access and
written back to it on assignment, or when changed in place (:mod:`~.state_handouts`). Nothing
is cached, so it never goes stale.

``opt.state`` itself is a :class:`StateAttribute`: code resets a torch optimizer by assigning it
(``opt.state = defaultdict(dict)``, or ``opt.__setstate__({"state": defaultdict(dict)})``), and
an assignment replaces the shards' state with the mapping's (:meth:`ShardStateView.replace`).

Talks to: the optimizer's public face (``param_groups``, ``backend``) and, through the backend
(:mod:`shardopt.client.backend`), the shards.
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

from shardopt.client.backend import Backend
from shardopt.client.state_handouts import Handouts
from shardopt.client.state_reads import StateReads
from shardopt.core.param_groups import group_options


class ShardStateView(MutableMapping):
    """``{param: state dict}`` for the parameters whose shard holds optimizer state.

    Args:
        optimizer: the optimizer whose state this is (held weakly: it owns the view).
        reads: its record of the last ``state_dict()``, told of every write here.
        handouts: where the dicts ``view[p]`` hands out are noted (what the user changes in
            them in place is written back before the shards are next used).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, reads: StateReads, handouts: Handouts
    ) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._reads = reads
        self._handouts = handouts

    @property
    def _opt(self) -> Any:
        opt = self._optimizer()
        if opt is None:
            raise ReferenceError("the optimizer of this state view no longer exists")
        return opt

    @property
    def _shards(self) -> Backend:
        """The backend, after following changes to the param groups' lists (param_forms):
        read once per operation."""
        opt = self._opt
        opt._follow_forms(forms=False)
        return opt.backend  # refuses once the optimizer is closed

    def __len__(self) -> int:
        return len(self._shards.state_order)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._shards.state_order
        params = [p for g in self._opt.param_groups for p in g["params"]]
        return iter([params[pid] for pid in order])

    def __contains__(self, param: object) -> bool:
        shards = self._shards
        pid = shards.shard_map.id_of(param)
        return pid is not None and shards.shard_map.has_state(pid)

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        """A copy of ``param``'s state from its shard; ``{}`` when it has none (as defaultdict).
        What is changed in it in place (a tensor, a value set or removed) is written back to
        the shard before the shards are next used (see :mod:`~.state_handouts`)."""
        shards = self._shards
        pid = shards.shard_map.id_of(param)
        if pid is None:
            raise KeyError(param)
        state: dict[str, Any] = {}
        if shards.shard_map.has_state(pid):
            for part in shards.state_parts((pid,)):
                state = part.get(pid, state)
        return self._handouts.hand_out(pid, state)

    def __setitem__(self, param: torch.Tensor, value: dict[str, Any]) -> None:
        shards = self._shards
        pid = _checked_id(shards, param, value)
        self._reads.changed()
        shards.set_param_state(pid, value)

    def __delitem__(self, param: torch.Tensor) -> None:
        """Drops ``param``'s state, as ``del`` (or ``pop``) does on torch's: its next step
        starts it afresh, and it then comes last in the state's order. Only the shards
        holding it are asked (over a gateway, and for LBFGS, the state is loaded without it)."""
        shards = self._shards
        pid = shards.shard_map.id_of(param)
        if pid is None or not shards.shard_map.has_state(pid):
            raise KeyError(param)
        self._reads.changed()
        shards.clear_param_state(pid, tuple(group_options(g) for g in self._opt.param_groups))

    def clear(self) -> None:
        """Drops all of the state at once (``opt.state.clear()``, a reset): every parameter
        starts afresh at its next step. (Mapping's own ``clear`` deletes one parameter at a
        time, and each deletion reloads every shard's state.)"""
        self.replace({})

    def replace(self, mapping: Mapping) -> None:
        """Replaces all of the state with ``mapping``'s (``{param: state dict}``; a parameter
        left out, or with an empty dict, starts afresh at its next step, as in torch), all or
        nothing: checked before anything changes.

        Raises:
            TypeError: not a mapping, or a value that is not a dict.
            KeyError: a key that is not a parameter of this optimizer.
            ValueError: state a shard refuses (nothing changed anywhere).
        """
        if not isinstance(mapping, Mapping):
            raise TypeError(
                "optimizer state must be a mapping of parameters to dicts, got "
                f"{type(mapping).__name__}"
            )
        shards = self._shards
        state: dict[int, dict[str, Any]] = {}
        for param, value in mapping.items():
            pid = _checked_id(shards, param, value)
            if value:
                state[pid] = dict(value)
        self._reads.changed()
        shards.load_state(state, tuple(group_options(g) for g in self._opt.param_groups))

    def snapshot(self, memo: dict[int, Any] | None = None) -> defaultdict:
        """The state as torch keeps it, detached from the shards: a ``defaultdict(dict)`` of
        ``{param: state}`` in torch's order, of fresh tensors (what ``copy.deepcopy`` and
        ``pickle`` make of a torch optimizer's ``state``); with a deep copy's ``memo``, keyed by
        its copies of the parameters."""
        shards = self._shards
        params = [p for g in self._opt.param_groups for p in g["params"]]
        gathered = shards.gathered_state()
        out: defaultdict = defaultdict(dict)
        for pid in shards.state_order:
            out[params[pid] if memo is None else copy.deepcopy(params[pid], memo)] = gathered[pid]
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> defaultdict:
        return self.snapshot(memo)  # a copy of a live view would stay live

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.snapshot().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"ShardStateView({len(self)} parameters with state)"


def _checked_id(shards: Backend, param: Any, value: Any) -> int:
    """The id of ``param``, whose state ``value`` is to be set.

    Raises:
        KeyError: not a parameter of this optimizer.
        TypeError: ``value`` is not a dict.
    """
    pid = shards.shard_map.id_of(param)
    if pid is None:
        raise KeyError("only parameters of this optimizer can have optimizer state")
    if not isinstance(value, dict):
        raise TypeError(
            f"optimizer state of a parameter must be a dict, got {type(value).__name__}"
        )
    return pid


class StateAttribute:
    """``ShardedOptimizer.state``: reads give the optimizer's :class:`ShardStateView`; an
    assignment replaces the shards' state with the mapping's (:meth:`ShardStateView.replace`),
    as assigning ``state`` resets a torch optimizer. Until the view is installed (torch's
    constructor assigns its ``defaultdict`` first) it is a plain value.
    """

    def __get__(self, opt: Any, owner: type | None = None) -> Any:
        if opt is None:
            return self
        held = opt.__dict__
        if "_state_view" in held:
            return held["_state_view"]
        if "_state_before_view" in held:
            return held["_state_before_view"]
        raise AttributeError("state")

    def __set__(self, opt: Any, value: Any) -> None:
        view = opt.__dict__.get("_state_view")
        if view is None:
            if isinstance(value, ShardStateView):
                opt.__dict__.pop("_state_before_view", None)
                opt.__dict__["_state_view"] = value
            else:
                opt.__dict__["_state_before_view"] = value
        elif value is not view:
            view.replace(value)
