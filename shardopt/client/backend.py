"""The one interface between the proxy and wherever its shards are.

:class:`~shardopt.client.optimizer.ShardedOptimizer` does torch.optim (validation, hooks,
``param_groups``, the state_dict format) and hands everything that moves tensors to one
:class:`Backend`, chosen once in its constructor:

- :class:`~shardopt.client.local.LocalShards`: shards of this process on Ray actors;
- :class:`~shardopt.client.shard_group.ShardGroupMember`: one worker of a shard group;
- :class:`~shardopt.client.gateway_session.GatewaySession`: a session on a gateway, over gRPC;
- :class:`~shardopt.client.lbfgs.LBFGSShards`: LBFGS's sharded vectors (a local backend).

A backend sees the proxy only through :class:`ParamSource` (its parameters and group options)
and keeps its own :class:`~shardopt.client.shard_map.ShardMap`. To add a backend, implement
this class in a module of its own and choose it in ``ShardedOptimizer._make_backend``.

Talks to: the proxy's parameters (:class:`ParamSource`).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from shardopt.checkpoint.format import SaveHandle
from shardopt.client.shard_map import ShardMap
from shardopt.core.amp import AmpScaling, unscale_here
from shardopt.core.param_groups import group_options
from shardopt.core.plan import ShardPlan
from shardopt.core.records import ParamBlock, ShardSpec, ShardStatus
from shardopt.core.step_checks import StepInputCheck


class ParamSource:
    """The proxy's parameters as a backend sees them: the user's tensors and group options.

    Holds the proxy weakly (``param_groups`` is replaced by loads, so it is read each time), and
    the class and hyperparameters the shards run, and the default dtype they run it under.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        optimizer_class: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        run_options: Callable[[dict[str, Any], list[torch.Tensor]], dict[str, Any]],
        group_splits: list[bool] | None = None,
        default_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.optimizer_class = optimizer_class
        self.defaults = defaults
        self.default_dtype = default_dtype
        """The client's default dtype when the optimizer was made (:mod:`.default_dtype`)."""
        self._pinned: list[dict[str, Any]] | None = None
        self._checks = StepInputCheck(optimizer_class, defaults, run_options)
        self.group_splits = group_splits if group_splits is not None else []
        """Per param group: whether its tensors may be split across shards (row ranges)."""

    def _proxy(self) -> torch.optim.Optimizer:
        optimizer = self._optimizer()
        if optimizer is None:
            raise ReferenceError("the optimizer of these parameters no longer exists")
        return optimizer

    @property
    def groups(self) -> list[dict[str, Any]]:
        return self._pinned if self._pinned is not None else self._proxy().param_groups

    @contextmanager
    def pinned(self, groups: list[dict[str, Any]]) -> Iterator[None]:
        """Reads as ``groups`` for the block: the param groups as a backend placed them, so
        that it reads its state by its own ids after the user's lists changed (param_forms)."""
        self._pinned = groups
        try:
            yield
        finally:
            self._pinned = None

    @property
    def full_defaults(self) -> dict[str, Any]:
        """Every hyperparameter's default as torch fills them in (the proxy's ``defaults``)."""
        return self._proxy().defaults

    def flat(self) -> list[torch.Tensor]:
        """Every parameter, in global id order."""
        return [p for g in self.groups for p in g["params"]]

    def splittable(self, group_index: int | None = None) -> list[bool]:
        """Per parameter (of one group, or of all in global id order): whether it may be split
        into row ranges across shards."""
        groups = self.groups
        chosen = range(len(groups)) if group_index is None else [group_index]
        splits = self.group_splits
        return [g < len(splits) and splits[g] for g in chosen for _ in groups[g]["params"]]

    def group_indices(self) -> list[int]:
        """The param group of every parameter, in global id order."""
        return [g for g, group in enumerate(self.groups) for _ in group["params"]]

    def options(self) -> tuple[dict[str, Any], ...]:
        """Every group's hyperparameters, as they are now (schedulers write them)."""
        return tuple(group_options(g) for g in self.groups)

    def spec(self, block: ParamBlock, options: tuple[dict[str, Any], ...]) -> ShardSpec:
        """What a shard holding ``block`` is made with (``options``: :meth:`options`)."""
        return ShardSpec(self.optimizer_class, self.defaults, options, block, self.default_dtype)

    def packed_groups(self, id_type: type = int) -> list[dict[str, Any]]:
        """``param_groups`` as torch's state_dict has them: parameters by id, in order."""
        packed_groups = []
        start = 0
        for group in self.groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [id_type(i) for i in range(start, start + len(group["params"]))]
            start += len(group["params"])
            packed_groups.append(packed)
        return packed_groups

    def check_step_inputs(self) -> None:
        """Refuses what torch refuses before a step updates anything (see step_checks)."""
        self._checks(self.groups)

    def evaluate(self, closure: Callable[[], Any] | None) -> Any:
        """The start of every step: the closure (if any) with grad enabled, then torch's
        checks of the gradients it left. Returns the closure's value."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_step_inputs()
        return loss

    def unscale_here(self, scaling: AmpScaling) -> bool:
        """What ``scaler.step`` does for an optimizer that does not take the scale (backends
        whose shards cannot): unscale every gradient in place. Returns False when an inf makes
        the step skip."""
        if scaling.skips:
            return False
        unscale_here(self.flat(), scaling)
        return True


class Backend(ABC):
    """Where a proxy's shards are, and how its tensors reach them (see the module docstring)."""

    shard_map: ShardMap
    kind = "backend"
    """What the ``backend`` label of ``shardopt_step_seconds`` calls it."""

    @property
    def num_shards(self) -> int:
        return self.shard_map.num_shards

    @property
    def plan(self) -> ShardPlan:
        return self.shard_map.plan

    @property
    def uses_shared_memory(self) -> list[bool]:
        return [False] * self.num_shards

    @property
    def state_order(self) -> list[int]:
        """Ids of the parameters with optimizer state, in torch's insertion order."""
        return self.shard_map.state_order

    # ----- stepping and parameters ----------------------------------------------------------

    @abstractmethod
    def step(self, closure: Callable[[], Any] | None, scaling: AmpScaling | None) -> Any:
        """Runs the closure (with grad enabled), checks the inputs, updates every shard and
        copies the new parameters into the user's tensors. Returns the closure's value."""

    @abstractmethod
    def pull_params(self) -> None:
        """Copies the shards' current parameters into the user's tensors."""

    @abstractmethod
    def push_params(self) -> None:
        """Sends the user's current parameter values to the shards."""

    @abstractmethod
    def add_param_group(self, group_index: int) -> None:
        """Places the parameters of the proxy's new group ``group_index`` on shards.

        Raises:
            ValueError: this backend's groups are fixed (nothing changed).
        """

    # ----- optimizer state ------------------------------------------------------------------

    @abstractmethod
    def state_parts(self, param_ids: tuple[int, ...] | None = None) -> Iterator[dict[int, Any]]:
        """The optimizer state by global id (all, or ``param_ids``), one shard's part at a time
        (fresh CPU tensors)."""

    def gathered_state(self) -> dict[int, Any]:
        """Every parameter's state by global id: all of :meth:`state_parts` at once."""
        state: dict[int, Any] = {}
        for part in self.state_parts():
            state.update(part)
        return state

    @abstractmethod
    def load_state(self, state: dict[int, dict[str, Any]], options: tuple[dict, ...]) -> None:
        """Replaces the optimizer state and the groups' options on every shard, all or nothing.

        Raises:
            ValueError, TypeError: a shard rejected its part (nothing changed anywhere).
        """

    def stream_state_file(
        self, path: str, order: list[int], param_groups: list[dict[str, Any]]
    ) -> bool:
        """Writes the state dict to ``path`` as ``torch.save`` does, straight from the shards,
        if this backend can (see :mod:`shardopt.client.state_file`).

        Returns:
            False when it cannot: the proxy then gathers the state and saves that.
        """
        return False

    @abstractmethod
    def set_param_state(self, pid: int, value: dict[str, Any]) -> None:
        """Replaces one parameter's state on its shard (``opt.state[p] = value``)."""

    def clear_param_state(self, pid: int, options: tuple[dict, ...]) -> None:
        """Drops one parameter's state (``del opt.state[p]``; it has state): here by loading
        all the state but its own with the groups' ``options``, for backends whose shards
        cannot drop one parameter's state alone."""
        state = self.gathered_state()
        kept = {i: state[i] for i in self.state_order if i != pid and i in state}
        self.load_state(kept, options)

    # ----- checkpoints, inspection, lifecycle -----------------------------------------------

    @abstractmethod
    def save_checkpoint(self, path: str, blocking: bool, key: bytes | None) -> SaveHandle:
        """Writes a sharded checkpoint (see :mod:`shardopt.checkpoint`), signed with ``key``."""

    @abstractmethod
    def load_checkpoint(self, path: str, key: bytes | None) -> list[dict[str, Any]]:
        """Loads a checkpoint (signed with ``key``, if given) on every shard, all or nothing;
        returns its param groups (with integer ids), for the proxy to adopt."""

    @abstractmethod
    def status(self) -> list[ShardStatus]:
        """What each shard reports about itself."""

    def shard_nodes(self) -> list[str | None]:
        """The Ray node of each shard (None where this backend does not know it)."""
        return [None] * self.num_shards

    def grad_slot(self, pid: int) -> torch.Tensor | None:
        """Where the next step takes parameter ``pid``'s gradient from, as a tensor shaped as
        the parameter, if there is one: a gradient written there and assigned to ``.grad`` is
        not copied again (None: the step copies ``.grad`` wherever it is)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Releases the shards. Idempotent."""
