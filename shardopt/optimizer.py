"""The client-side proxy: a real ``torch.optim.Optimizer`` whose state lives on Ray shards.

:class:`ShardedOptimizer` keeps the user's ``param_groups`` (their own tensors, every option torch
would show) and nothing else of the optimizer: the master copy of each parameter and all optimizer
state live on shard actors (:mod:`shardopt.shard`), placed by :mod:`shardopt.plan`. A step packs
each shard's gradients into one flat buffer, the shards update in parallel with torch's own
optimizer, and the new values are copied back into the user's tensors in place.

Talks to: shard hosts through Ray (:mod:`shardopt.runtime`), with the records of
:mod:`shardopt.records` and the buffers of :mod:`shardopt.buffers`.
"""

from __future__ import annotations

import datetime
import logging
import os
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from itertools import chain
from typing import Any

import ray
import torch

from shardopt import checkpoint
from shardopt.buffers import (
    FlatLayout,
    pack_tree,
    readonly_tensor,
    to_numpy,
)
from shardopt.data_path import GradShipper, LocalDataPath
from shardopt.errors import OptimizerClosedError, ShardUnavailableError
from shardopt.group_client import GroupClient, make_config
from shardopt.groups import check_param_groups, copy_param_groups, group_options
from shardopt.plan import ShardPlan
from shardopt.records import (
    ParamBlock,
    ShardSpec,
    ShardStatus,
    StepRequest,
)
from shardopt.remote_client import RemoteClient, group_request
from shardopt.replication import Replicas, kill_hosts
from shardopt.runtime import drop_shards, ensure_ray, host_pool, ray_get
from shardopt.state_view import ShardStateView

logger = logging.getLogger(__name__)


def default_num_shards() -> int:
    """One shard per GPU where the cluster has GPUs, else one per alive node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus >= 1:
        return gpus
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


class ShardedOptimizer(LocalDataPath, torch.optim.Optimizer):
    """Any ``torch.optim`` optimizer, with its state and master parameters sharded on Ray actors.

    Behaves as ``optimizer_class(params, **defaults)`` would, step for step and in its
    ``state_dict`` format, while each shard actor runs ``optimizer_class`` over its share of the
    parameters (whole tensors, balanced by bytes).

    Args:
        params: the parameters, or dicts defining param groups, or ``(name, tensor)`` pairs,
            exactly as for ``torch.optim``.
        optimizer_class: a ``torch.optim.Optimizer`` subclass (torch's or your own).
        num_shards: how many shards; by default one per GPU in the cluster, else one per node.
        actor_options: options for the shard actors (``ray.remote(...).options(**actor_options)``),
            e.g. ``{"num_gpus": 1}`` to run each shard on its own GPU.
        shared_memory: exchange gradients and parameters with CPU shards on this node through
            shared memory (``/dev/shm``) instead of Ray's object store; by default wherever
            possible. ``False`` forces the object store.
        overlap: copy each gradient towards its shard as soon as backward has produced it
            (post-accumulate-grad hooks), so ``step()`` waits only for what is left. Gradients
            changed after backward (GradScaler, clipping) are noticed and sent again.
        share_params: with shared memory, re-point the user's CPU parameters into the shards'
            buffers, so a step copies no parameters back. The tensors stay the same objects
            but their storage moves: views taken of them earlier no longer follow them.
        group: attach this worker to the named shard group (created by the first worker to
            arrive): many workers, one sharded optimizer. See ``docs`` in the README and
            :mod:`shardopt.group`. The options below apply to groups only.
        world_size: how many workers the group has.
        rank: this worker's rank in ``[0, world_size)``.
        mode: ``"sync"`` (each step averages all workers' gradients, as DDP does, and every
            worker gets the same parameters) or ``"async"`` (each worker's gradients are
            applied as they arrive).
        max_staleness: async only: gradients computed on parameters more than this many
            versions old are not applied; the worker gets fresh parameters (and, with a
            closure, computes again).
        timeout: how long a sync step waits for the other workers before failing with
            :class:`~shardopt.errors.GroupTimeoutError` (a ``timedelta`` or seconds).
        placement: a Ray placement strategy for the group's shards: ``"STRICT_SPREAD"``
            (one per node), ``"SPREAD"``, ``"PACK"``, ``"STRICT_PACK"``.
        shard_resources: what each shard reserves under ``placement`` (default one CPU;
            ``{"GPU": 1}`` puts one shard per GPU).
        replicate: keep an in-memory replica of every shard on another node, so that a lost
            shard actor (or node) is replaced with nothing lost (see
            :mod:`shardopt.replication`). ``True`` (or 1): the replicas run every step too;
            an int ``k > 1``: they are refreshed from their primaries every ``k`` steps and
            this process keeps the gradients since, to replay after a loss. Costs a second
            copy of each shard's parameters, gradients and state (and, with ``k``, up to
            ``k`` gradient copies here).
        address: ``"host:port"`` of a shardopt gateway (``shardopt serve``): the shards are
            reached over gRPC instead of Ray, and this process needs no Ray at all.
        token: the gateway's bearer token.
        tls: with ``address``: True for TLS with the system's root certificates, or the path
            of a PEM file of root certificates; False/None for plaintext.
        **defaults: ``optimizer_class``'s hyperparameters.

    Raises:
        TypeError: ``optimizer_class`` is not a torch optimizer class.
        ValueError: ``num_shards < 1``, or a hyperparameter ``optimizer_class`` rejects, or
            (groups) bad group options or a worker that differs from its group.
        PlacementError: the cluster cannot place the group's shards as asked.

    Example:
        >>> import torch, shardopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = shardopt.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3,
        ...                                 num_shards=2)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
        >>> opt.close()
    """

    _shards_lbfgs = False  # shardopt.LBFGS sets it: per-tensor sharding is wrong for LBFGS

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer],
        *,
        num_shards: int | None = None,
        actor_options: dict[str, Any] | None = None,
        shared_memory: bool | None = None,
        overlap: bool = False,
        share_params: bool = False,
        group: str | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        mode: str = "sync",
        max_staleness: int | None = None,
        timeout: datetime.timedelta | float = datetime.timedelta(minutes=5),
        placement: str | None = None,
        shard_resources: dict[str, float] | None = None,
        replicate: bool | int = False,
        address: str | None = None,
        token: str | None = None,
        tls: bool | str | os.PathLike | None = None,
        **defaults: Any,
    ) -> None:
        if not (
            isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}"
            )
        if issubclass(optimizer_class, torch.optim.LBFGS) and not self._shards_lbfgs:
            raise TypeError(
                "LBFGS needs dot products across all shards: use shardopt.LBFGS(params, ...)"
            )
        if num_shards is not None and (not isinstance(num_shards, int) or num_shards < 1):
            raise ValueError(f"Invalid num_shards: {num_shards} (must be an int >= 1)")
        if group is None and (world_size, rank, max_staleness, placement) != (None,) * 4:
            raise ValueError("world_size, rank, max_staleness and placement need group=...")
        if group is not None and self._shards_lbfgs:
            raise ValueError("shardopt.LBFGS runs one closure over all shards: it has no groups")
        if replicate and (group is not None or address is not None or self._shards_lbfgs):
            raise ValueError(
                "replicate=True applies to a ShardedOptimizer in the Ray cluster, not to "
                "groups, gateway sessions or LBFGS"
            )
        if not isinstance(replicate, (bool, int)) or replicate < 0:
            raise ValueError(f"Invalid replicate: {replicate!r} (False, True, or steps >= 1)")
        self._replicate = int(replicate)
        self._replicas: Replicas | None = None
        if address is not None and (
            actor_options or shared_memory or overlap or share_params or self._shards_lbfgs
        ):
            raise ValueError(
                "actor_options, shared_memory, overlap, share_params and LBFGS apply to "
                "optimizers in the Ray cluster; with address=... the gateway decides"
            )
        if address is not None and (placement is not None or shard_resources is not None):
            raise ValueError(
                "with address=..., the gateway's operator places the shards (shardopt serve "
                "--placement/--shard-resources): placement and shard_resources cannot be set"
            )
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be "
                "an iterable of Tensors or dicts, but got " + torch.typename(params)
            )
        params = list(params)
        # The real class validates every hyperparameter with torch's own errors and tells us its
        # full defaults. It creates no state worth keeping (Adagrad's is dropped right here).
        template = optimizer_class(copy_param_groups(params), **defaults)
        full_defaults = dict(template.defaults)
        del template

        self.optimizer_class = optimizer_class
        self._shard_defaults = dict(defaults)
        self._actor_options = dict(actor_options or {})
        self._shared_memory = shared_memory
        self._overlap = overlap
        self._share_params = share_params
        self._closed = False
        self._shards_ready = False
        super().__init__(params, full_defaults)

        if any(g.get("differentiable") for g in self.param_groups):
            warnings.warn(
                "differentiable=True: the shards compute the same numbers, but no autograd "
                "graph connects the update on the shards to the parameters here",
                stacklevel=2,
            )
        self._group: GroupClient | None = None
        self._remote: RemoteClient | None = None
        self._state_order: dict[int, None] = {}
        group_settings = dict(
            world_size=world_size, rank=rank, mode=mode, max_staleness=max_staleness,
            timeout=timeout, placement=placement, shard_resources=shard_resources,
            actor_options=self._actor_options,
        )  # fmt: skip
        if address is not None:  # the group's options are checked here, before connecting
            config = make_config(num_shards=num_shards or 1, **group_settings) if group else None
            self._open_remote(address, token, tls, num_shards, group_request(group, rank, config))
            return
        ensure_ray()
        self._num_shards = num_shards or default_num_shards()
        if group is not None:
            config = make_config(num_shards=self._num_shards, **group_settings)
            self._group = GroupClient(group, rank, config)
        self._plan = ShardPlan.empty(self._num_shards)
        self._layouts = [FlatLayout.for_specs([]) for _ in range(self._num_shards)]
        self._shard_params: list[list[int]] = [[] for _ in range(self._num_shards)]
        self._local: list[tuple[int, int]] = []  # global id -> (shard, local index)
        self._ids_by_tensor: dict[int, int] = {}
        self._versions: list[tuple[int, int]] = []
        self._next_step_id = 0
        self._staging: list[torch.Tensor | None] = [None] * self._num_shards
        self._shipped: dict[int, tuple[int, int]] = {}
        self._start_shards()
        self.state = ShardStateView(self)

    def _open_remote(
        self,
        address: str,
        token: str | None,
        tls: bool | str | os.PathLike | None,
        num_shards: int | None,
        group: dict[str, Any] | None,
    ) -> None:
        """Opens a session on a gateway instead of starting shards (``address=...``)."""
        params = self._flat_params()
        self._ids_by_tensor = {id(p): i for i, p in enumerate(params)}
        self._versions = [(p._version, p.data_ptr()) for p in params]
        self._remote = remote = RemoteClient(address, token, tls)
        self._finalizer = weakref.finalize(self, remote.close)
        session = remote.open(self, num_shards, group)
        self._num_shards = session.num_shards
        self._plan = remote.plan(session, self)
        self._shm = [None] * self._num_shards
        self._shards_ready = True
        self.state = ShardStateView(self)

    # ----- the parameters -------------------------------------------------------------------

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _param_id(self, param: object) -> int | None:
        return self._ids_by_tensor.get(id(param))

    @property
    def plan(self) -> ShardPlan:
        """Which shard owns which parameter (global ids in param_groups order)."""
        return self._plan

    @property
    def uses_shared_memory(self) -> list[bool]:
        """Per shard: whether gradients and parameters move through shared memory."""
        return [m is not None for m in self._shm]

    @property
    def num_shards(self) -> int:
        return self._num_shards

    def _place(self, new_params: list[torch.Tensor], groups: list[int]) -> list[ParamBlock]:
        """Assigns new parameters to shards and returns each shard's block of initial values."""
        first = len(self._local)
        self._plan = self._plan.extended([p.numel() * p.element_size() for p in new_params])
        self._local.extend([(-1, -1)] * len(new_params))
        blocks = []
        for s in range(self._num_shards):
            picks = [j for j in range(len(new_params)) if self._plan.owners[first + j] == s]
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
            base = len(self._shard_params[s])
            for k, j in enumerate(picks):
                self._shard_params[s].append(first + j)
                self._local[first + j] = (s, base + k)
            self._layouts[s] = self._layouts[s].extended(list(zip(layout.shapes, layout.dtypes)))
        for j, p in enumerate(new_params):
            self._ids_by_tensor[id(p)] = first + j
            self._versions.append((p._version, p.data_ptr()))
            if self._overlap:
                p.register_post_accumulate_grad_hook(GradShipper(self, first + j))
        return blocks

    def _start_shards(self) -> None:
        params = self._flat_params()
        groups = [g for g, group in enumerate(self.param_groups) for _ in group["params"]]
        blocks = self._place(params, groups)
        options = tuple(group_options(g) for g in self.param_groups)
        specs = [
            ShardSpec(self.optimizer_class, self._shard_defaults, options, blocks[s])
            for s in range(self._num_shards)
        ]
        self._shm: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self._num_shards
        if self._group is not None:
            self._group.join(self, specs)
            self._shards_ready = True
            return
        self._hosts, infos = host_pool.acquire(self._num_shards, self._actor_options)
        owner = host_pool.new_owner_key()
        self._keys = [f"{owner}/{s}" for s in range(self._num_shards)]
        self._finalizer = weakref.finalize(self, drop_shards, self._hosts, self._keys)
        here = ray.get_runtime_context().get_node_id()
        shared = [
            self._shared_memory is not False and info["node_id"] == here and info["device"] == "cpu"
            for info in infos
        ]
        self._host_nodes = [info["node_id"] for info in infos]
        threads = self._threads = self._threads_per_shard(self._host_nodes)
        created = ray_get(
            [
                h.create.remote(k, s, specs[s], shared[s], threads[s])
                for s, (h, k) in enumerate(zip(self._hosts, self._keys))
            ]
        )
        for s, (_, buffers) in enumerate(created):
            self._map_shared(s, buffers)
        self._note_state(chain.from_iterable(ids for ids, _ in created))
        if self._replicate:
            self._replicas = Replicas(self, interval=self._replicate)
            weakref.finalize(self, kill_hosts, self._replicas.owned)
            self._replicas.start(specs, threads)
        self._shards_ready = True

    def _note_state(self, param_ids: Iterable[int]) -> None:
        for pid in sorted(param_ids):
            self._state_order.setdefault(pid, None)

    def _check_open(self) -> None:
        if self._closed:
            raise OptimizerClosedError("this optimizer was closed; its shards are released")

    def _call(self, shard: int, method: str, *args: Any) -> Any:
        ref = self._hosts[shard].call.remote(self._keys[shard], method, *args)
        if self._replicas is not None:
            self._replicas.mirror(shard, method, args)
        return ref

    # ----- torch.optim.Optimizer ------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group (torch's semantics); its parameters go to the least-loaded shards."""
        shards_ready = getattr(self, "_shards_ready", False)
        if shards_ready:
            self._check_open()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len(group["params"]) != len(set(group["params"])):
            self.param_groups.pop()
            raise ValueError(
                "optimizer contains a parameter group with duplicate parameters; "
                "shardopt cannot shard a parameter twice"
            )
        if not shards_ready:
            return
        if self._remote is not None:
            try:
                self._remote.add_param_group(self, group)
            except BaseException:
                self.param_groups.pop()
                raise
            first = len(self._versions)
            for j, p in enumerate(group["params"]):
                self._ids_by_tensor[id(p)] = first + j
                self._versions.append((p._version, p.data_ptr()))
            return
        if self._group is not None:
            self.param_groups.pop()
            raise ValueError(
                f"the param groups of shard group {self._group.name!r} were fixed when it was "
                "created; create the optimizer with all of them"
            )
        g = len(self.param_groups) - 1
        blocks = self._place(list(group["params"]), [g] * len(group["params"]))
        options = group_options(group)
        buffers = ray_get(
            [self._call(s, "add_param_group", options, blocks[s]) for s in range(self._num_shards)]
        )
        for s, shard_buffers in enumerate(buffers):
            self._map_shared(s, shard_buffers)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs the closure (if any) here, then one update on every shard in parallel.

        Returns:
            The closure's return value, or None, as ``torch.optim`` does.
        """
        self._check_open()
        if self._remote is not None:
            return self._remote.step(self, closure)
        if self._group is not None:
            return self._group.step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._flat_params()
        options = tuple(group_options(g) for g in self.param_groups)
        step_id = self._next_step_id
        self._next_step_id += 1
        pending: dict[int, Any] = {}
        updated: dict[int, list[int]] = {}
        replicas = self._replicas
        sent: dict[int, tuple[StepRequest, torch.Tensor]] = {}
        if replicas is not None:
            replicas.settle()
        for s in range(self._num_shards):
            ids = self._shard_params[s]
            if not ids:
                continue
            changed = self._changed_params(s, params)
            flat, has_grad, sparse, touched = self._pack_grads(s, params)
            if not touched:
                if changed is not None:
                    ray_get(self._call(s, "set_params", changed))
                continue
            request = StepRequest(
                step_id=step_id,
                group_options=options,
                grads=None if self._shm[s] is not None else to_numpy(flat),
                has_grad=has_grad,
                sparse_grads=sparse,
                params_in=changed,
            )
            pending[s] = self._call(s, "step", request)
            updated[s] = touched
            if replicas is not None:
                replicas.step(s, replace(request, grads=to_numpy(flat), return_params=False))
                sent[s] = (request, flat)
        self._shipped.clear()
        new_state: list[int] = []
        shard_of = {ref: s for s, ref in pending.items()}
        waiting = list(pending.values())
        while waiting:  # copy each shard's parameters back as soon as it is done
            done, waiting = ray.wait(waiting, num_returns=1)
            s = shard_of[done[0]]
            try:
                result = ray_get(done[0])
            except ShardUnavailableError:
                if replicas is None:
                    raise
                ref = replicas.recover(s, *sent[s])
                shard_of[ref] = s
                waiting.append(ref)
                continue
            shm = self._shm[s]
            values = shm[0] if shm is not None else readonly_tensor(result.params)
            layout = self._layouts[s]
            for j in updated[s]:
                pid = self._shard_params[s][j]
                p = params[pid]
                source = layout.view(values, j)
                if p.data_ptr() != source.data_ptr():  # share_params: already in place
                    p.copy_(source)
                self._record_version(pid, p)
            new_state.extend(result.new_state_ids)
        self._note_state(new_state)
        return loss

    def pull_params(self) -> None:
        """Copies the shards' current parameters into this process's tensors.

        A step does this by itself; in a shard group, other workers' steps move the
        parameters in between (async mode), and a worker may want them before its next step.
        """
        self._check_open()
        if self._remote is not None:
            self._remote.pull(self)
            return
        if self._group is not None:
            self._group.pull(self)
            return
        params = self._flat_params()
        remote = [s for s in range(self._num_shards) if self._shard_params[s] and not self._shm[s]]
        values = dict(zip(remote, ray_get([self._call(s, "param_values") for s in remote])))
        for s in range(self._num_shards):
            shm = self._shm[s]
            if not self._shard_params[s] or (shm is None and s not in values):
                continue
            flat = shm[0] if shm is not None else readonly_tensor(values[s])
            for j, pid in enumerate(self._shard_params[s]):
                source = self._layouts[s].view(flat, j)
                if params[pid].data_ptr() != source.data_ptr():
                    params[pid].detach().copy_(source)
                self._record_version(pid, params[pid])

    @property
    def group(self) -> GroupClient | None:
        """This worker's shard group membership (versions, ``last_push``), or None."""
        return self._group

    def push_params(self) -> None:
        """Sends the current values of all parameters to the shards.

        shardopt notices in-place changes to parameters (``load_state_dict`` on the model,
        ``torch.nn.init``) by their version counters, but PyTorch does not version writes made
        through ``param.data``; call this after such writes.
        """
        self._check_open()
        if self._remote is not None:
            self._remote.push_params(self)
            return
        params = self._flat_params()
        self._versions = [(-1, -1)] * len(params)
        updates = {s: self._changed_params(s, params) for s in range(self._num_shards)}
        ray_get([self._call(s, "set_params", u) for s, u in updates.items() if u is not None])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, gathered from the shards one at a time.

        Returns:
            ``{"state": {id: {...}}, "param_groups": [...]}``, equal to what
            ``optimizer_class.state_dict()`` gives for the same run (state tensors on CPU).
        """
        self._check_open()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {"state": self._gathered_state(), "param_groups": self._packed_groups()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _packed_groups(self, id_type: type = int) -> list[dict[str, Any]]:
        """``param_groups`` as torch's state_dict has them: parameters by id, in order."""
        packed_groups = []
        start = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [id_type(i) for i in range(start, start + len(group["params"]))]
            start += len(group["params"])
            packed_groups.append(packed)
        return packed_groups

    def _gathered_state(self) -> dict[int, Any]:
        """Every parameter's state by id, in torch's order, from the shards one at a time."""
        if self._remote is not None:
            return self._remote.state()
        gathered: dict[int, Any] = {}
        shards = [s for s in range(self._num_shards) if self._shard_params[s]]
        # One shard's state unpacked here while the next one packs: at most two in flight.
        ref = self._request_state(shards[0]) if shards else None
        for i in range(len(shards)):
            next_ref = self._request_state(shards[i + 1]) if i + 1 < len(shards) else None
            gathered.update(self._receive_state(ref))
            ref = next_ref
        order = list(self._state_order) + sorted(set(gathered) - set(self._state_order))
        return {pid: gathered[pid] for pid in order if pid in gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a torch.optim state dict (from torch or from shardopt with any shard count).

        All-or-nothing: every shard validates its part first, and only if all accept does any
        apply it. A rejected state dict leaves every shard and every param group as it was.

        Raises:
            ValueError: the groups or the state do not match this optimizer's parameters.
            TypeError: the state holds objects other than tensors, numbers, strings and plain
                containers.
        """
        self._check_open()
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = check_param_groups(self.param_groups, state_dict["param_groups"])
        if self._remote is not None:
            self._remote.load_state_dict(
                self, {"state": state_dict["state"], "param_groups": saved_groups}
            )
        else:
            self._load_state(state_dict["state"], saved_groups)
        self._adopt_saved_groups(saved_groups)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _adopt_saved_groups(self, saved_groups: list[dict[str, Any]]) -> None:
        """Takes a loaded state dict's group options, keeping this optimizer's tensors (torch's
        ``update_group``)."""
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            for name, default in self.defaults.items():
                saved.setdefault(name, default)
            new_groups.append(saved)
        self.param_groups = new_groups

    def _load_state(self, saved_state: dict[Any, Any], saved_groups: list[dict]) -> None:
        """Validates the loaded state on every shard, then applies it on all or none."""
        id_map = dict(
            zip(chain.from_iterable(g["params"] for g in saved_groups), range(len(self._local)))
        )
        per_shard: list[dict[int, Any]] = [{} for _ in range(self._num_shards)]
        order = []
        for key, value in saved_state.items():
            if key not in id_map:
                raise ValueError(
                    f"loaded state dict has state for parameter id {key!r}, "
                    "which is in none of its parameter groups"
                )
            pid = id_map[key]
            if not isinstance(value, dict):
                raise TypeError(
                    f"state of parameter id {key!r} must be a dict, got {type(value).__name__}"
                )
            per_shard[self._local[pid][0]][pid] = value
            order.append(pid)
        options = tuple(group_options(g) for g in saved_groups)
        packed = [pack_tree(part) for part in per_shard]
        token = uuid.uuid4().hex
        live = [s for s in range(self._num_shards) if self._shard_params[s]]
        errors = ray_get([self._call(s, "prepare_load", token, options, packed[s]) for s in live])
        self._apply_prepared(token, live, errors)
        self._state_order = dict.fromkeys(order)

    # ----- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(
        self, path: str | os.PathLike, *, blocking: bool = True
    ) -> checkpoint.SaveHandle:
        """Writes a sharded checkpoint: every shard its own file, in parallel, from its actor.

        The directory is a torch.distributed.checkpoint checkpoint (see
        :mod:`shardopt.checkpoint`); ``dcp_to_torch_save`` turns it into a torch.optim state
        dict. The commit record is written last, by rename: a save that dies part-way leaves
        no checkpoint that loads. Saving over an existing checkpoint uncommits it first.

        Args:
            path: a directory (or ``file://`` URL) every shard can write to, or a
                ``memory://`` URL (fsspec's in-process store; this process then does the I/O).
            blocking: wait for the commit. With False, training can go on at once; the
                checkpoint holds the state as of this call once ``handle.wait()`` commits it.

        Returns:
            A handle with ``wait()`` and ``done()`` (already committed when blocking).
        """
        self._check_open()
        if self._remote is not None:
            if not blocking:
                raise ValueError("over gRPC, checkpoints are saved with blocking=True")
            self._remote.save_checkpoint(str(path))
            return checkpoint.SaveHandle(_poll=lambda: True, _finish=lambda: None, _committed=True)
        handle = checkpoint.save(self, path, blocking)
        if self._replicas is not None:  # the fallback when a shard and its replica are lost
            taken = (str(path), self._next_step_id)
            if handle.done():
                self._replicas.checkpoint = taken
            else:
                finish = handle._finish

                def finish_and_note() -> None:
                    finish()
                    self._replicas.checkpoint = taken

                handle._finish = finish_and_note
        return handle

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Loads a checkpoint written with any number of shards (resharding as it loads).

        Every data file's checksum is checked first; then each shard reads its own parameters'
        state and validates it, and only if all accept does any apply it.

        Raises:
            FileNotFoundError: no committed checkpoint at ``path``, or a data file is missing.
            ValueError: a corrupted data file, or a checkpoint of other parameter groups.
        """
        self._check_open()
        if self._remote is not None:
            self._remote.load_checkpoint(str(path))
            return
        checkpoint.load(self, path)
        if self._replicas is not None:
            self._replicas.checkpoint = (str(path), self._next_step_id)

    def _checkpoint_parts(self) -> Iterable[dict[int, Any]]:
        """The state, one shard's part at a time, for checkpoints this process writes."""
        for s in range(self._num_shards):
            if self._shard_params[s]:
                yield self._receive_state(self._request_state(s))

    def _apply_prepared(self, token: str, live: list[int], errors: list[Any]) -> None:
        """Phase two of an all-or-nothing load: commit on every shard, or abort on all."""
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            ray_get([self._call(s, "abort_load", token) for s in live])
            raise failure
        ray_get([self._call(s, "commit_load", token) for s in live])

    # ----- the state view's backend ---------------------------------------------------------

    def _fetch_param_state(self, pid: int) -> dict[str, Any]:
        self._check_open()
        if self._remote is not None:
            return self._remote.state([pid]).get(pid, {})
        return self._receive_state(self._request_state(self._local[pid][0], (pid,))).get(pid, {})

    def _store_param_state(self, pid: int, value: dict[str, Any]) -> None:
        self._check_open()
        if not isinstance(value, dict):
            raise TypeError(
                f"optimizer state of a parameter must be a dict, got {type(value).__name__}"
            )
        if self._remote is not None:
            state = self._remote.state()
            state[pid] = value
            self._remote.load_state_dict(
                self, {"state": state, "param_groups": self._packed_groups()}
            )
            return
        shard = self._local[pid][0]
        ray_get(self._call(shard, "set_param_state", pid, pack_tree(value)))
        self._state_order.setdefault(pid, None)

    # ----- inspection and lifecycle ---------------------------------------------------------

    def shard_status(self) -> list[ShardStatus]:
        """What each shard reports: device, parameter count and bytes, which ids have state."""
        self._check_open()
        if self._remote is not None:
            raise NotImplementedError("shard_status() is not served over gRPC")
        return ray_get([self._call(s, "status") for s in range(self._num_shards)])

    def close(self) -> None:
        """Releases the shards (their hosts return to the pool). Idempotent."""
        if not self._closed:
            self._closed = True
            self._shm = [None] * self._num_shards
            self._finalizer()
            if self._replicas is not None:
                self._replicas.close()

    def __enter__(self) -> ShardedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        text = super().__repr__()
        label = type(self).__name__
        if label != self.optimizer_class.__name__:
            label += f"[{self.optimizer_class.__name__}]"
        return text.replace(type(self).__name__ + " (", f"{label} x{self._num_shards} shards (", 1)
