"""The client-side proxy: a real ``torch.optim.Optimizer`` whose state lives on shards.

:class:`ShardedOptimizer` keeps the user's ``param_groups`` (their own tensors, every option torch
would show) and torch.optim's semantics: argument validation with torch's own errors, hooks,
``state_dict``/``load_state_dict`` in torch's format, the state view. Everything that moves
tensors goes to one :class:`~shardopt.client.backend.Backend` chosen in the constructor: shards of
this process on Ray actors, a shard group, or a gateway session.

Talks to: its backend (:mod:`shardopt.client.backend`).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from shardopt.checkpoint.format import SaveHandle
from shardopt.client import state_file
from shardopt.client.backend import Backend, ParamSource
from shardopt.client.checkpoints import checkpoint_done
from shardopt.client.copying import CopyRules, made_with
from shardopt.client.gateway_session import GatewaySession
from shardopt.client.group_config import group_request
from shardopt.client.local import LocalShards
from shardopt.client.param_forms import FormRules
from shardopt.client.replication import replica_interval
from shardopt.client.runtime import default_num_shards, ensure_ray
from shardopt.client.shard_group import HEARTBEAT_TIMEOUT, ShardGroupMember, make_config
from shardopt.client.state_handouts import Handouts
from shardopt.client.state_reads import StateReads
from shardopt.client.state_view import ShardStateView, StateAttribute
from shardopt.client.transport import check_transport
from shardopt.core.amp import scaling_of
from shardopt.core.default_dtype import check_default_dtype
from shardopt.core.errors import OptimizerClosedError
from shardopt.core.metrics import STEP_SECONDS
from shardopt.core.param_groups import (
    adopt_saved_groups,
    check_param_groups,
    copy_param_groups,
    group_options,
    run_options,
    split_choice,
)
from shardopt.core.plan import ShardPlan
from shardopt.core.records import ShardStatus

logger = logging.getLogger(__name__)


class ShardedOptimizer(CopyRules, FormRules, torch.optim.Optimizer):
    """Any ``torch.optim`` optimizer, with its state and master parameters sharded on Ray actors.

    Behaves as ``optimizer_class(params, **defaults)`` would, step for step and in its
    ``state_dict`` format, while each shard actor runs ``optimizer_class`` over its share of the
    parameters (balanced by bytes and tensor count; big tensors split by rows: see
    :mod:`shardopt.core.plan`).

    Args:
        params: the parameters, or dicts defining param groups, or ``(name, tensor)`` pairs,
            exactly as for ``torch.optim``.
        optimizer_class: a ``torch.optim.Optimizer`` subclass (torch's or your own).
        num_shards: how many shards; by default one per GPU in the cluster, else one per node.
        actor_options: options for the shard actors (``ray.remote(...).options(**actor_options)``),
            e.g. ``{"num_gpus": 1}`` to run each shard on its own GPU.
        shared_memory: exchange gradients and parameters with CPU shards on this node through
            shared memory (``/dev/shm``) instead of Ray's object store; by default wherever
            possible. ``False`` forces the object store. (A group's shards too.)
        overlap: copy each gradient towards its shard as soon as backward has produced it
            (post-accumulate-grad hooks), so ``step()`` waits only for what is left. Gradients
            changed in place after backward (clipping, GradScaler) are sent again (by version
            counters: writes through ``grad.data`` are not seen). A shard group refuses it.
        share_params: with shared memory, re-point the user's CPU parameters into the shards'
            buffers, so a step copies no parameters back. The tensors stay the same objects
            but their storage moves: views taken of them earlier no longer follow them
            (``channels_last`` ones keep their layout and are copied). (A
            sync group's workers on its shards' node then share one copy of the parameters.)
        group: attach this worker to the named shard group (created by the first worker to
            arrive): many workers, one sharded optimizer (README; :mod:`~.shard_group`).
        world_size: how many workers the group has (elastic: at most; None for no bound).
        rank: this worker's rank in ``[0, world_size)`` (elastic: None assigns one).
        mode: ``"sync"`` (each step averages all workers' gradients, as DDP does, and every
            worker gets the same parameters) or ``"async"`` (each worker's gradients are
            applied as they arrive).
        max_staleness: async only: gradients computed on parameters more than this many
            versions old are not applied; the worker gets fresh parameters (a closure reruns).
        timeout: how long a sync step waits for the other workers before failing with
            :class:`~shardopt.core.errors.GroupTimeoutError` (a ``timedelta`` or seconds).
        elastic: (sync) workers may come and go: one that dies, or sends no heartbeat for
            ``heartbeat_timeout`` (default 10 s), is dropped and the round completes, averaged
            over the workers that contributed; new ones join at a round boundary
            (:mod:`shardopt.actor.group_membership`; ``opt.group.members()``).
        placement: a Ray placement strategy for the group's shards: ``"STRICT_SPREAD"``
            (one per node), ``"SPREAD"``, ``"PACK"``, ``"STRICT_PACK"``. None: beside the
            workers (spread over the nodes of the creating worker's placement group, else on
            its node; :func:`~shardopt.actor.placement.worker_nodes`).
        shard_resources: what each shard reserves under ``placement`` (default one CPU;
            ``{"GPU": 1}`` puts one shard per GPU).
        replicate: keep an in-memory replica of every shard on another node, so that a lost
            shard actor (or node) is replaced with nothing lost (:mod:`~.replication`): ``True``
            (or 1) one replica; an int ``k``: ``k`` replicas (sync shard groups; a worker's own
            shards have one). Costs a copy of each shard's parameters, gradients and state each.
        replica_refresh: (a worker's own shards, ``replicate=True``) refresh each replica from
            its primary every ``k`` steps instead of running every step on it (this process
            keeps the gradients since, to replay after a loss). Default 1: every step.
        split: whether a tensor may be split along dim 0 into row ranges on several shards,
            so that one big tensor (an embedding) does not decide a shard's bytes and step
            time. By default torch's element-wise algorithms split (SGD, Adam, AdamW, ...;
            :data:`~shardopt.core.param_groups.SPLITS_BY_DEFAULT`), Adafactor and Muon never,
            your own class only with ``split=True``. A param group may say ``"split": False``
            (or True) for its own tensors. Numbers and ``state_dict`` are the same either way.
        transport: ``"auto"``, ``"object_store"``, ``"cuda_ipc"`` or ``"nixl"``: how tensors
            reach each shard (:mod:`shardopt.client.transport`; :meth:`shard_status` shows it).
        address: ``"host:port"`` of a shardopt gateway (``shardopt serve``): the shards are
            reached over gRPC instead of Ray, and this process needs no Ray at all.
        token: the gateway's bearer token.
        tls: with ``address``: True for TLS with the system's root certificates, or the path
            of a PEM file of root certificates; False/None for plaintext.
        reconnect_timeout: with ``address``: how long a call retries, with backoff, while no
            gateway answers (one restarting with ``--session-store`` resumes the session; a
            step is then sent again under its id and applied once); 0: fail at once.
        default_dtype: the default dtype the shards run torch's code under, as torch.optim
            would in this process (``step`` is float64 under a float64 default); None:
            ``torch.get_default_dtype()`` now.
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
        elastic: bool = False,
        heartbeat_timeout: datetime.timedelta | float = HEARTBEAT_TIMEOUT,
        placement: str | None = None,
        shard_resources: dict[str, float] | None = None,
        replicate: bool | int = False,
        replica_refresh: int = 1,
        split: bool | None = None,
        transport: str = "auto",
        address: str | None = None,
        token: str | None = None,
        tls: bool | str | os.PathLike | None = None,
        reconnect_timeout: datetime.timedelta | float = datetime.timedelta(minutes=2),
        default_dtype: torch.dtype | None = None,
        **defaults: Any,
    ) -> None:
        self._made_with = made_with(locals())  # for copy.deepcopy (see shardopt.client.copying)
        if not (
            isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}"
            )
        if issubclass(optimizer_class, torch.optim.LBFGS) and self._local_backend.per_tensor:
            raise TypeError(
                "LBFGS needs dot products across all shards: use shardopt.LBFGS(params, ...)"
            )
        if num_shards is not None and (not isinstance(num_shards, int) or num_shards < 1):
            raise ValueError(f"Invalid num_shards: {num_shards} (must be an int >= 1)")
        if group is None and (world_size, rank, max_staleness, placement) != (None,) * 4:
            raise ValueError("world_size, rank, max_staleness and placement need group=...")
        check_transport(transport, group, address)
        if elastic and (group is None or address is not None):
            raise ValueError("elastic=True applies to shard groups in the Ray cluster (group=...)")
        if group is not None and not self._local_backend.per_tensor:
            raise ValueError("shardopt.LBFGS runs one closure over all shards: it has no groups")
        refresh = replica_interval(
            replicate, replica_refresh, group, address is None and self._local_backend.per_tensor
        )
        if address is not None and (
            actor_options or shared_memory or overlap or share_params or split is not None
        ):
            raise ValueError(
                "actor_options, shared_memory, overlap, share_params and split apply to "
                "optimizers in the Ray cluster; with address=... the gateway decides"
            )
        if address is not None and (placement is not None or shard_resources is not None):
            raise ValueError(
                "with address=..., the gateway's operator places the shards (shardopt serve "
                "--placement/--shard-resources): placement and shard_resources cannot be set"
            )
        if isinstance(params, torch.Tensor):
            raise TypeError(  # torch's words
                "params argument given to the optimizer should be an iterable of Tensors or "
                "dicts, but got " + torch.typename(params)
            )
        params = list(params)
        # The real class validates every hyperparameter with torch's own errors and tells us its
        # full defaults. It creates no state worth keeping (Adagrad's is dropped right here).
        full_defaults = dict(optimizer_class(copy_param_groups(params), **defaults).defaults)

        self.optimizer_class = optimizer_class
        self._split = split_choice(optimizer_class, split, "") and self._local_backend.per_tensor
        self._group_splits: list[bool] = []  # per param group: may its tensors be split
        self._closed = False
        self._backend: Backend | None = None
        self._step_supports_amp_scaling = True  # torch.amp.GradScaler: see shardopt.core.amp
        super().__init__(params, full_defaults)

        if any(g.get("differentiable") for g in self.param_groups):
            warnings.warn(
                "differentiable=True: the shards compute the same numbers, but no autograd "
                "graph connects the update on the shards to the parameters here",
                stacklevel=2,
            )
        dtype = self._made_with[0]["default_dtype"] = check_default_dtype(default_dtype)
        source = ParamSource(
            self, optimizer_class, dict(defaults),
            lambda o, ps: run_options(optimizer_class, o, ps, dtype), self._group_splits, dtype,
        )  # fmt: skip
        options = dict(
            num_shards=num_shards, actor_options=dict(actor_options or {}),
            shared_memory=shared_memory, overlap=overlap, share_params=share_params,
            group=group, world_size=world_size, rank=rank, mode=mode,
            max_staleness=max_staleness, timeout=timeout, placement=placement,
            elastic=elastic, heartbeat_timeout=heartbeat_timeout,
            shard_resources=shard_resources, replicate=int(replicate) if group else refresh,
            address=address, token=token, tls=tls, reconnect_timeout=reconnect_timeout,
            transport=transport,
        )  # fmt: skip
        self._backend = self._make_backend(source, **options)
        self._params = source
        self._note_forms(options)  # dtypes and shapes as placed (see param_forms)
        self._state_reads = StateReads()  # what state_dict() returned (round trips)
        self._handouts = Handouts(self._state_reads)  # what opt.state[p] handed out
        self.state = ShardStateView(self, self._state_reads, self._handouts)

    _local_backend: type[LocalShards] = LocalShards
    """The backend for shards of this process (shardopt.LBFGS plugs in its own here)."""
    state = StateAttribute()  # the shards' state; assigning it replaces that (a reset)

    def _make_backend(
        self,
        source: ParamSource,
        *,
        num_shards: int | None,
        actor_options: dict[str, Any],
        group: str | None,
        rank: int | None,
        address: str | None,
        token: str | None,
        tls: bool | str | os.PathLike | None,
        shared_memory: bool | None,
        overlap: bool,
        share_params: bool,
        replicate: int,
        reconnect_timeout: datetime.timedelta | float,
        transport: str,
        **group_settings: Any,
    ) -> Backend:
        """The one backend this optimizer uses, chosen once (see :mod:`shardopt.client.backend`):
        a gateway session (``address``), a shard group's member (``group``), or shards of this
        process (:attr:`_local_backend`)."""
        settings = dict(rank=rank, actor_options=actor_options, overlap=overlap, **group_settings)
        if address is not None:  # the group's options are checked here, before connecting
            config = make_config(num_shards=num_shards or 1, **settings) if group else None
            request = group_request(group, rank, config)
            return GatewaySession(
                source, address, token, tls, num_shards, request, reconnect_timeout
            )
        ensure_ray()
        num_shards = num_shards or default_num_shards()
        if group is not None:
            config = make_config(num_shards=num_shards, replicate=replicate, **settings)
            return ShardGroupMember(source, group, rank, config, shared_memory, share_params)
        return self._local_backend(
            source, num_shards, actor_options=actor_options, shared_memory=shared_memory,
            overlap=overlap, share_params=share_params, replicate=replicate, transport=transport,
        )  # fmt: skip

    # ----- what the backend knows -----------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The shards' backend (what was changed in place in ``opt.state[p]`` goes first)."""
        self._check_open()
        self._handouts.settle(self._backend)
        return self._backend  # type: ignore[return-value]

    @property
    def plan(self) -> ShardPlan:
        """Which shard owns which parameter (global ids in param_groups order)."""
        return self.backend.plan

    @property
    def uses_shared_memory(self) -> list[bool]:
        """Per shard: whether gradients and parameters move through shared memory."""
        return self.backend.uses_shared_memory

    @property
    def num_shards(self) -> int:
        return self.backend.num_shards

    @property
    def group(self) -> ShardGroupMember | None:
        """This worker's shard group membership (versions, ``last_push``, ``members()``)."""
        backend = self._backend
        return backend if isinstance(backend, ShardGroupMember) else None

    def _check_open(self) -> None:
        if self._closed:
            raise OptimizerClosedError("this optimizer was closed; its shards are released")

    # ----- torch.optim.Optimizer ------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group (torch's semantics); its parameters go to the least-loaded shards."""
        backend = getattr(self, "_backend", None)
        if backend is not None:
            self._follow_forms(forms=False)  # new ids follow the parameters as listed now
            backend = self._backend
        if isinstance(param_group, dict) and "split" in param_group:  # shardopt's, not torch's
            param_group = dict(param_group)
            asked = param_group.pop("split")
            split = split_choice(self.optimizer_class, asked, "in a param group")
            split = split and self._local_backend.per_tensor
        else:
            split = self._split
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len(group["params"]) != len(set(group["params"])):
            self.param_groups.pop()
            raise ValueError(
                "optimizer contains a parameter group with duplicate parameters; "
                "shardopt cannot shard a parameter twice"
            )
        self._group_splits.append(split)
        if backend is None:  # torch's constructor adding the first groups
            return
        self._state_reads.changed()
        try:
            backend.add_param_group(len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            self._group_splits.pop()
            raise
        self._note_forms()

    @torch.compiler.disable  # moves bytes to other processes: nothing to trace
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs the closure (if any) here, then one update on every shard in parallel.

        All or nothing, as in torch: what torch refuses before updating (a sparse gradient for
        a dense algorithm, a gradient of another shape, dtype or device) is refused before any
        shard is asked. Under a ``torch.amp.GradScaler`` the shards unscale and skip as torch
        does (see :mod:`shardopt.core.amp`).

        Returns:
            The closure's return value, or None, as ``torch.optim`` does.

        Raises:
            PartialStepError: the step failed on some shards (a shard's error, or its actor
                lost) after others had applied it (only without replicas; with them a lost
                shard is replaced and the step goes on, and for a shard's error every shard is
                rolled back first and that error is raised).
            ShardUnavailableError: a shard's actor was lost and no shard applied the step
                (without replicas).
        """
        self._follow_forms()  # a model converted after the optimizer was made (param_forms)
        backend = self.backend
        self._state_reads.changed()
        start = time.perf_counter()
        loss = backend.step(closure, scaling_of(self))
        seconds = time.perf_counter() - start
        STEP_SECONDS.labels(self.optimizer_class.__name__, backend.kind).observe(seconds)
        return loss

    def pull_params(self) -> None:
        """Copies the shards' current parameters into this process's tensors (a step does this
        by itself; in an async shard group, other workers' steps move them in between)."""
        self.backend.pull_params()

    def push_params(self) -> None:
        """Sends the current values of all parameters to the shards.

        shardopt notices in-place changes to parameters (``load_state_dict`` on the model,
        ``torch.nn.init``) by their version counters, but PyTorch does not version writes made
        through ``param.data``; call this after such writes.
        """
        self.backend.push_params()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, gathered from the shards one at a time.

        Returns:
            ``{"state": {id: {...}}, "param_groups": [...]}``, equal to what
            ``optimizer_class.state_dict()`` gives for the same run (tensors on its devices).
        """
        self._follow_forms(forms=False)  # the state by the parameters as listed now (param_forms)
        backend = self.backend
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        gathered = backend.gathered_state()
        order = backend.state_order
        order += sorted(set(gathered) - set(order))
        state_dict = {
            "state": {pid: gathered[pid] for pid in order if pid in gathered},
            "param_groups": self._params.packed_groups(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._state_reads.note(state_dict.get("state") if isinstance(state_dict, dict) else None)
        return state_dict

    def save_state_dict(self, path: str | os.PathLike) -> None:
        """Writes the file ``torch.save(self.state_dict(), path)`` writes, straight from the
        shards: this process never holds the whole state (one chunk of a shard's part at a
        time), so state bigger than its memory can be saved. Atomic: ``path`` is the old file
        or the whole new one. Read it back with ``torch.load(path, weights_only=True)``, or
        with ``mmap=True`` to map rather than read it (then :meth:`load_state_dict` holds one
        shard's part at a time). With state_dict hooks registered it gathers the state and
        runs them first, as :meth:`state_dict` does.
        """
        path = os.fspath(path)
        self._follow_forms(forms=False)
        backend = self.backend
        hooks = self._optimizer_state_dict_pre_hooks or self._optimizer_state_dict_post_hooks
        if hooks or not backend.stream_state_file(
            path, backend.state_order, self._params.packed_groups()
        ):
            state_file.save_whole(self.state_dict(), path)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a torch.optim state dict (from torch or from shardopt with any shard count).

        All-or-nothing: every shard validates its part first, and only if all accept does any
        apply it. A rejected state dict leaves every shard and every param group as it was.

        Raises:
            ValueError: the groups or the state do not match this optimizer's parameters.
            TypeError: the state holds objects other than tensors, numbers, strings and plain
                containers.
        """
        self._follow_forms()
        backend = self.backend
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = check_param_groups(self.param_groups, state_dict["param_groups"])
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                range(sum(len(g["params"]) for g in self.param_groups)),
            )
        )
        state: dict[int, Any] = {}
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(
                    f"loaded state dict has state for parameter id {key!r}, "
                    "which is in none of its parameter groups"
                )
            if not isinstance(value, dict):
                raise TypeError(
                    f"state of parameter id {key!r} must be a dict, got {type(value).__name__}"
                )
            state[id_map[key]] = value
        if not self._state_reads.unchanged(state_dict["state"]):  # (a round trip: as it is)
            self._state_reads.changed()
            backend.load_state(state, tuple(group_options(g) for g in saved_groups))
        self._adopt_saved_groups(saved_groups)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _adopt_saved_groups(self, saved_groups: list[dict[str, Any]]) -> None:
        self.param_groups = adopt_saved_groups(self.param_groups, saved_groups, self.defaults)

    # ----- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(
        self, path: str | os.PathLike, *, blocking: bool = True, key: bytes | None = None
    ) -> SaveHandle:
        """Writes a sharded checkpoint: every shard its own file, in parallel, from its actor.

        The directory is a torch.distributed.checkpoint checkpoint (see
        :mod:`shardopt.checkpoint`); ``dcp_to_torch_save`` turns it into a torch.optim state
        dict. A commit record with the SHA-256 of every file is written, then DCP's
        ``.metadata`` (by rename, or one put on an object store): a save that dies part-way
        leaves no new checkpoint that loads, and a checkpoint it was replacing loads as it was
        until the commit. One save at a time per directory (per URL and process on an object
        store, which has no lock across processes: see ``SECURITY.md``).

        Args:
            path: a directory (or ``file://`` URL) every shard can write to, an object store
                URL such as ``s3://bucket/run/step-100`` (any fsspec protocol whose file system
                is installed; every shard uploads its own object, with the credentials in its
                node's environment), or a ``memory://`` URL (fsspec's in-process store; this
                process then does the I/O).
            blocking: wait for the commit. With False, training can go on at once; the
                checkpoint holds the state as of this call once ``handle.wait()`` commits it.
            key: an HMAC key (at least 16 bytes, e.g. from
                :func:`shardopt.checkpoint.integrity.read_key`) that signs the commit record;
                loads given the key accept only checkpoints signed with it.

        Returns:
            A handle with ``wait()`` and ``done()`` (already committed when blocking).

        Raises:
            CheckpointInUseError: another save to ``path`` is in progress.
        """
        start = time.perf_counter()
        self._follow_forms(forms=False)
        handle = self.backend.save_checkpoint(os.fspath(path), blocking, key)
        where = os.fspath(path)
        handle.on_commit(lambda commit: checkpoint_done("save", where, start, commit))
        return handle

    def load_checkpoint(self, path: str | os.PathLike, *, key: bytes | None = None) -> None:
        """Loads a checkpoint written with any number of shards (resharding as it loads).

        The commit record is checked first (with ``key``: its signature too), before anything
        is unpickled; ``.metadata`` is unpickled with an allowlist of DCP's metadata classes and
        values with ``weights_only``. Then each shard reads its own parameters' state, checking
        every slice's SHA-256, and validates it; only if all accept does any apply it.

        Args:
            path: the checkpoint's directory, or its ``file://``, object store (``s3://``...)
                or ``memory://`` URL.
            key: the HMAC key checkpoints must be signed with (None: any intact checkpoint).

        Raises:
            FileNotFoundError: no committed checkpoint at ``path``, or a data file is missing.
            ValueError: a corrupted or changed file, a missing or wrong signature (with
                ``key``), metadata that is not DCP's, or a checkpoint of other parameter groups.
        """
        start = time.perf_counter()
        self._follow_forms()
        self._state_reads.changed()
        saved_groups = self.backend.load_checkpoint(os.fspath(path), key)
        self._adopt_saved_groups(saved_groups)
        checkpoint_done("load", os.fspath(path), start, None)

    # ----- inspection and lifecycle ---------------------------------------------------------

    def shard_status(self) -> list[ShardStatus]:
        """What each shard reports: device, transport, parameter count and bytes, state ids."""
        return self.backend.status()

    def close(self) -> None:
        """Releases the shards (their hosts return to the pool). Idempotent."""
        if not self._closed:
            self._closed = True
            if self._backend is not None:
                self._backend.close()

    def __enter__(self) -> ShardedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        text = super().__repr__()
        label = type(self).__name__
        if label != self.optimizer_class.__name__:
            label += f"[{self.optimizer_class.__name__}]"
        shards = self._backend.num_shards if self._backend is not None else "?"
        return text.replace(type(self).__name__ + " (", f"{label} x{shards} shards (", 1)
