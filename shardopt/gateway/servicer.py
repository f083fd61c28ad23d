"""The optimizer service's servicer: each session a ShardedOptimizer over tensors held here.

Each session is a :class:`~shardopt.client.optimizer.ShardedOptimizer` living in the gateway process
(so the shards, the state_dict format and the all-or-nothing loads are [core]'s own) over parameter
tensors the gateway holds for the client (:mod:`shardopt.gateway.sessions`). Clients push gradients,
step and pull parameters through ``protos/shardopt/v1/optimizer.proto``; sessions may be members of
shard groups (:mod:`shardopt.actor.shard_group_registry`). Token holders are tenants: a session is
visible only to the token that opened it, group names and checkpoint directories are scoped by the
token, what a session spec may set is decided by :mod:`shardopt.gateway.admission`, and what a token
may hold by :mod:`shardopt.gateway.quotas`.

Every stream is checked before it changes anything (:class:`shardopt.core.wire.TensorReceiver`):
declared sizes against the limits and quotas before any allocation, chunks for order and size
as they arrive, and a session changes only when the whole stream has arrived. Errors map to one
status each through :data:`shardopt.core.errors.GRPC_STATUS`; their messages name no server path.

Talks to: the sessions' optimizers (and through them Ray); the ledger; clients over gRPC.
"""

from __future__ import annotations

import logging
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import ray
import torch

from shardopt.client.lbfgs import LBFGS
from shardopt.client.optimizer import ShardedOptimizer
from shardopt.client.runtime import default_num_shards
from shardopt.core import chunk_codec, wire
from shardopt.core.errors import AccessDeniedError, PullConflictError, ShardoptError
from shardopt.core.events import emit
from shardopt.core.param_groups import group_options
from shardopt.core.proto import pb, rpc
from shardopt.gateway.admission import (
    NOT_OPTIONS,
    OPTIMIZERS,
    ShardSettings,
    check_group_options,
    check_group_update,
    check_param_dtype,
    checkpoint_path,
    checkpoint_root,
    optimizer_kwargs,
    param_groups_of,
    scope_of,
)
from shardopt.gateway.auth import ANONYMOUS, bearer_token, principal_of
from shardopt.gateway.closure_step import ClosureStep
from shardopt.gateway.gradients import GradientUpload
from shardopt.gateway.handling import Malformed, abort
from shardopt.gateway.handling import handled as _handled
from shardopt.gateway.handling import handled_stream as _handled_stream
from shardopt.gateway.quotas import Ledger, Limits
from shardopt.gateway.resume import HeldGroupOptimizer, StoreLink, is_lbfgs, repeat_from
from shardopt.gateway.sessions import Session, SessionTable
from shardopt.gateway.status import session_info, shard_infos

logger = logging.getLogger(__name__)


def _principal(context: grpc.ServicerContext) -> str:
    return principal_of(bearer_token(context.invocation_metadata()))


def _messages(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Malformed):
            raise wire.WireError(f"malformed message in stream: {request.error}")
        yield request


def _first(requests: Iterator[Any], kind: str) -> Any:
    first = next(requests, None)
    if first is None or first.WhichOneof("kind") != kind:
        raise wire.WireError(f"a stream must start with its {kind}")
    return getattr(first, kind)


def _receive(receiver: wire.TensorReceiver, requests: Iterator[Any]) -> list[torch.Tensor]:
    for request in requests:
        if request.WhichOneof("kind") != "chunk":
            raise wire.WireError(f"expected a chunk, got a {request.WhichOneof('kind')}")
        receiver.add(request.chunk)
    return receiver.finish()


def _encode_groups(optimizer: ShardedOptimizer) -> list[Any]:
    return wire.encode_groups(optimizer.param_groups)


def _build(
    groups: list[dict], optimizer_class: type, kwargs: dict[str, Any], holder: str | None
) -> ShardedOptimizer:
    """A session's optimizer: LBFGS runs its vectors on the shards (stepped by ClosureStep); a
    group member with a session store is held by it (``holder``: it outlives this process); a
    plain one's tensors here are its shards' own where they share memory (``share_params``)."""
    if optimizer_class is torch.optim.LBFGS:
        if "group" in kwargs:
            raise ValueError("LBFGS runs one closure over all its shards: it joins no group")
        return LBFGS(groups, **kwargs)
    if holder is not None and "group" in kwargs:
        return HeldGroupOptimizer(groups, optimizer_class, holder, False, **kwargs)
    return ShardedOptimizer(groups, optimizer_class, share_params="group" not in kwargs, **kwargs)


def _stepped(session: Session) -> Any:
    """Counts a session's step; its ``StepReply`` (with each group shard's answer)."""
    optimizer = session.optimizer
    session.steps += 1
    reply = pb.StepReply(steps=session.steps, state_order=optimizer.backend.state_order)
    if optimizer.group is not None:
        for r in optimizer.group.last_push:
            push = reply.pushes.add(shard=r.shard_index, read_version=r.read_version)
            if r.applied_version is not None:
                push.applied_version = r.applied_version
    return reply


class OptimizerGateway(rpc.OptimizerServiceServicer):
    """The servicer: sessions by id, each a ShardedOptimizer over tensors held here.

    Args:
        limits: the gateway's limits and quotas.
        checkpoint_dir: where tokens' checkpoint directories live: a directory or an object
            store URL (None: checkpoints refused).
        shards: the operator's placement of group shards.
        checkpoint_key: the HMAC key that signs every checkpoint saved; loads then accept only
            checkpoints signed with it (None: checksummed, not signed).
        operators: principals of operators' tokens (they may list every tenant's sessions).
        store: where resumable sessions are recorded (``--session-store``; None: sessions end
            with this process).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        checkpoint_dir: str | None = None,
        shards: ShardSettings | None = None,
        checkpoint_key: bytes | None = None,
        operators: list[str] = (),
        store: StoreLink | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.operators = frozenset(operators)  # principals of operators' tokens
        self.checkpoint_dir = checkpoint_root(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_key = checkpoint_key  # signs saves; loads need its signature
        self.shards = shards or ShardSettings()
        self.ledger = Ledger(self.limits)
        self.sessions = SessionTable(self.ledger, self.limits.session_idle_timeout_s)
        self.store = store
        if store is not None:
            self.sessions.on_close = store.drop

    # ----- sessions ---------------------------------------------------------------------------

    def _use(self, context: grpc.ServicerContext, session_id: str) -> Any:
        """The caller's session ``session_id``, in use for the ``with`` block."""
        return self.sessions.use(_principal(context), session_id)

    def _shard_counts(self) -> tuple[int, int]:
        """(the most shards a session may have, the shards of a session that names none)."""
        cap = self.limits.max_shards
        if cap is None:  # the cluster's, now: nodes may have joined since the gateway started
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
            cap = gpus if gpus >= 1 else max(1, cpus)
        return cap, min(cap, default_num_shards())

    @_handled
    def OpenSession(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        principal = _principal(context)
        spec = _first(requests, "spec")
        optimizer_class = OPTIMIZERS.get(spec.optimizer)
        if optimizer_class is None:
            raise ValueError(
                f"unknown optimizer {spec.optimizer!r}; served: {', '.join(sorted(OPTIMIZERS))}"
            )
        if len(spec.params) > self.limits.max_params:
            raise wire.LimitError(
                f"{len(spec.params)} parameters declared (at most {self.limits.max_params})"
            )
        max_shards, default_shards = self._shard_counts()
        kwargs = optimizer_kwargs(
            spec, optimizer_class, principal, self.limits, self.shards, max_shards, default_shards
        )
        hyperparameters = wire.decode_options(spec.hyperparameters)
        group_specs = [
            check_group_options(wire.decode_options(g.options), f"param group {i}")
            for i, g in enumerate(spec.param_groups)
        ]
        for i, options in enumerate(group_specs):
            merged = {**hyperparameters, **options}
            check_group_update(optimizer_class, merged, f"param group {i}", self.limits)
        names = [s.name or f"params[{i}]" for i, s in enumerate(spec.params)]
        receiver = wire.TensorReceiver(
            list(spec.params), self.limits.max_session_bytes, what="parameter", names=names
        )
        for s, n in zip(spec.params, names):
            check_param_dtype(wire.checked_spec(s, n)[0], n)
        nbytes, session_id = receiver.declared, uuid.uuid4().hex
        self.ledger.open_session(principal, nbytes)
        try:
            params = _receive(receiver, requests)
            groups = param_groups_of(spec, params, group_specs)
            holder = self.store.holder_of(session_id) if self.store is not None else None
            optimizer = _build(groups, optimizer_class, kwargs, holder)
        except BaseException:
            self.ledger.close_session(principal, nbytes)
            raise
        session = Session(session_id, principal, optimizer, params, names, nbytes)
        if self.store is not None:
            try:  # recorded before its client hears of it
                self.store.put(session, kwargs)
            except BaseException:
                optimizer.close()
                self.ledger.close_session(principal, nbytes)
                raise
        self.sessions.add(session)
        emit(
            logger, "session_opened", session=session.session_id, scope=scope_of(principal),
            optimizer=spec.optimizer, params=len(params), bytes=nbytes,
            shards=optimizer.num_shards, group=spec.group.name or None,
        )  # fmt: skip
        group = optimizer.group
        return pb.Session(
            session_id=session.session_id,
            param_groups=_encode_groups(optimizer),
            num_shards=optimizer.num_shards,
            owners=list(optimizer.plan.owners),
            created_group=bool(group and group.membership and group.membership.created),
            state_order=optimizer.backend.state_order,
        )

    @_handled
    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        closed = self.sessions.close(_principal(context), request.session_id)
        return pb.CloseSessionReply(closed=closed)

    def resume(self) -> int:
        """Resumes the sessions its store recorded (before serving); returns how many."""
        if self.store is None:
            return 0
        return len(self.store.resume(self.sessions))

    def start(self) -> None:
        """Starts closing sessions unused for ``Limits.session_idle_timeout_s`` (and beating
        to the session store)."""
        self.sessions.start()
        if self.store is not None:
            self.store.start(self.sessions)

    def stop(self) -> None:
        """Stops the expiry of idle sessions (they stay open: :meth:`close_all`)."""
        self.sessions.stop()
        if self.store is not None:
            self.store.stop()

    def close_all(self) -> None:
        """Closes every session (graceful shutdown); with a session store, its sessions are
        handed over to the next gateway instead."""
        if self.store is not None:
            self.sessions.hand_over()
        else:
            self.sessions.close_all()

    # ----- stepping ---------------------------------------------------------------------------

    @_handled
    def PushGradients(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        with self._use(context, header.session_id) as session:
            held = claim = None
            try:
                with session.lock:  # received straight into the shards' buffers when free
                    claim, into = session.claim_grad_targets(self.ledger) or (None, None)
                upload = GradientUpload(
                    header, session.params, session.names, session.nbytes,
                    self.limits.upload_budget(session.nbytes), into,
                    spans=chunk_codec.asks_spanning(context.invocation_metadata()),
                )  # fmt: skip
                held = self.ledger.hold(
                    session.principal, upload.declared, (session.session_id, session.nbytes)
                )
                grads = upload.receive(requests)  # nothing is staged unless all of it arrived
                if next(requests, None) is not None:
                    raise wire.WireError("a chunk after every declared gradient was complete")
            except BaseException:
                with session.lock:
                    session.release_transfer(claim)
                if held is not None:
                    held.release()
                raise
            with session.lock:
                if session.closed:
                    held.release()
                    session.check_open()
                session.unstage()
                for i, grad in grads.items():
                    session.params[i].grad = grad
                session.grads_ready = True
                session.staged = held  # held until a step consumes them
                session.staged_transfer = claim
        return pb.PushGradientsReply(bytes=upload.bytes_received)

    @_handled
    def Step(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session, session.lock:
            session.check_steppable()
            if request.skip:
                session.check_vote()  # before anything changes
            elif not session.grads_ready:
                raise ShardoptError("no gradients staged: call PushGradients before each Step")
            if request.HasField("step_id"):
                repeat_from(session, request.step_id)
            if request.param_groups:
                self._update_groups(session, request.param_groups)
            try:
                (session.vote_skip if request.skip else session.optimizer.step)()
            finally:
                session.unstage()
            return _stepped(session)

    @_handled_stream
    def ClosureStep(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        requests = _messages(requests)
        start = _first(requests, "start")
        with self._use(context, start.session_id) as session, session.lock:
            session.check_steppable()
            session.unstage()  # the closure computes the gradients
            if start.param_groups:
                self._update_groups(session, start.param_groups)
            store = self.store if session.recorded and is_lbfgs(session) else None
            marked = []

            def begin() -> None:  # a restart from here on refuses the session's steps
                store.update(session, stepping=True)
                marked.append(True)

            def done(loss: float | None) -> Any:
                reply = _stepped(session)
                reply.loss = loss if loss is not None else float("nan")
                if marked:  # recorded before the client hears the step is done
                    store.lbfgs_stepped(session)
                    marked.clear()
                return reply

            run = ClosureStep(
                session, requests, self.ledger, self.limits, done, begin if store else None
            )
            try:
                yield from run.replies()
            finally:
                if marked:  # a step that raised: its state as it is (as torch's would be)
                    store.lbfgs_stepped(session)

    @_handled_stream
    def PullParameters(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self._use(context, request.session_id) as session:
            with session.lock:
                if session.optimizer.group is not None:
                    session.optimizer.pull_params()
                params, names = list(session.params), list(session.names)
                unchanged = session.lock.generation + 1  # once this hold ends
            # streamed straight from the parameters without the lock (a slow reader never holds
            # up the session): each chunk is encoded, then checked to have been read while no
            # call held the lock, else the pull is refused as a whole (the client pulls again)
            encode = chunk_codec.answer_chunks(context)  # before the header (sends metadata)
            specs = [wire.spec_of(p, n) for p, n in zip(params, names)]
            yield pb.PullParametersReply(header=pb.PullParametersHeader(params=specs))
            for chunk in encode(params):
                if session.lock.generation != unchanged:
                    raise PullConflictError(
                        "the session's parameters changed while they were being pulled (a "
                        "call such as Step or LoadStateDict ran during the pull); pull again"
                    )
                yield chunk

    @_handled
    def PushParameters(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        with self._use(context, header.session_id) as session:
            receiver = wire.TensorReceiver(
                list(header.params), session.nbytes, expected=session.expected(),
                what="parameter", names=session.names,
            )  # fmt: skip
            upload = (session.session_id, session.nbytes)
            with self.ledger.buffered(session.principal, receiver.declared, upload):
                values = _receive(receiver, requests)
                with session.lock, torch.no_grad():
                    for p, v in zip(session.params, values):
                        p.copy_(v)
                    session.optimizer.push_params()
        return pb.PushParametersReply(bytes=receiver.bytes_received)

    # ----- param groups -----------------------------------------------------------------------

    def _update_groups(self, session: Session, groups: Any) -> None:
        optimizer = session.optimizer
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(
                f"{len(groups)} param groups given, the optimizer has {len(optimizer.param_groups)}"
            )
        for g, (new, old) in enumerate(zip(groups, _encode_groups(optimizer))):
            if list(new.params) and list(new.params) != list(old.params):
                raise ValueError(f"param group {g}: its parameters cannot change")
        decoded = [
            check_group_options(wire.decode_options(g.options), f"param group {i}")
            for i, g in enumerate(groups)
        ]
        cls = optimizer.optimizer_class
        for i, (group, options) in enumerate(zip(optimizer.param_groups, decoded)):
            merged = {**group_options(group), **options}
            check_group_update(cls, merged, f"param group {i}", self.limits, group_options(group))
        for group, options in zip(optimizer.param_groups, decoded):  # all checked: now apply
            group.update(options)

    def _record_again(self, session: Session) -> None:
        """Records a session as it is now (its param groups grew); if that fails, a restart
        will not resume it (its old record would not match its shards)."""
        try:
            self.store.put(session)
        except Exception:
            logger.exception("session %s: recording it again failed", session.session_id)
            self.store.forget(session)

    @_handled
    def GetParamGroups(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session, session.lock:
            return pb.ParamGroups(param_groups=_encode_groups(session.optimizer))

    @_handled
    def UpdateParamGroups(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session, session.lock:
            self._update_groups(session, request.param_groups)
            return pb.ParamGroups(param_groups=_encode_groups(session.optimizer))

    @_handled
    def AddParamGroup(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        with self._use(context, header.session_id) as session:
            if len(session.params) + len(header.params) > self.limits.max_params:
                raise wire.LimitError(f"more than {self.limits.max_params} parameters")
            start = len(session.params)
            names = [s.name or f"params[{start + i}]" for i, s in enumerate(header.params)]
            receiver = wire.TensorReceiver(
                list(header.params), self.limits.max_session_bytes - session.nbytes,
                what="parameter", names=names,
            )  # fmt: skip
            for s, n in zip(header.params, names):
                check_param_dtype(wire.checked_spec(s, n)[0], n)
            optimizer = session.optimizer
            options = check_group_options(
                wire.decode_options(header.group.options), "the new param group"
            )
            merged, cls = {**optimizer.defaults, **options}, optimizer.optimizer_class
            check_group_update(cls, merged, "the new param group", self.limits)
            nbytes = receiver.declared
            self.ledger.grow_session(session.principal, nbytes)
            try:
                values = _receive(receiver, requests)
                with session.lock:
                    session.check_open()  # else the bytes it grew by would never be given back
                    optimizer.add_param_group({**options, "params": values})
                    session.params.extend(values)
                    session.names.extend(names)
                    session.nbytes += nbytes
                    session.placements.append(1)
                    if self.store is not None:
                        self._record_again(session)
            except BaseException:
                self.ledger.shrink_session(session.principal, nbytes)
                raise
            return pb.ParamGroups(param_groups=_encode_groups(optimizer))

    # ----- state dicts and checkpoints --------------------------------------------------------

    @_handled_stream
    def GetStateDict(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self._use(context, request.session_id) as session:
            with session.lock:
                state_dict = session.optimizer.state_dict()
            if request.params:
                wanted = set(request.params)
                state = state_dict["state"]
                state_dict["state"] = {k: v for k, v in state.items() if k in wanted}
            tensors: list[torch.Tensor] = []
            structure = wire.encode_value(state_dict, tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            with self.ledger.buffered(session.principal, nbytes):
                header = pb.StateDictHeader(
                    state_dict=structure, tensors=[wire.spec_of(t) for t in tensors]
                )
                yield pb.StateDictMessage(header=header)
                yield from chunk_codec.encoded_chunks(tensors)

    @_handled
    def LoadStateDict(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        with self._use(context, header.session_id) as session:
            limit = self.limits.upload_budget(session.nbytes)
            receiver = wire.TensorReceiver(list(header.tensors), limit, what="state tensor")
            upload = (session.session_id, session.nbytes)
            with self.ledger.buffered(session.principal, receiver.declared, upload):
                tensors = _receive(receiver, requests)
                state_dict = wire.decode_value(header.state_dict, tensors)
                if not isinstance(state_dict, dict) or set(state_dict) != {
                    "state",
                    "param_groups",
                }:
                    raise ValueError(
                        "a state dict is a dict with exactly 'state' and 'param_groups'"
                    )
                optimizer = session.optimizer
                groups = state_dict["param_groups"]
                if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                    raise ValueError("a state dict's 'param_groups' is a list of dicts")
                cls = optimizer.optimizer_class
                for i, group in enumerate(groups):
                    options = {k: v for k, v in group.items() if k not in NOT_OPTIONS}
                    check_group_update(cls, options, f"param group {i}", self.limits)
                with session.lock:
                    optimizer.load_state_dict(state_dict)
                    if self.store is not None:  # an LBFGS session's state is in its record
                        self.store.lbfgs_stepped(session)
                    return pb.LoadStateDictReply(state_order=optimizer.backend.state_order)

    def _checkpoint_path(self, principal: str, relative: str) -> pathlib.Path | str:
        if self.checkpoint_dir is None:
            raise PermissionError("this gateway has no checkpoint directory (--checkpoint-dir)")
        return checkpoint_path(self.checkpoint_dir, principal, relative)

    @_handled
    def SaveCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session:
            path = self._checkpoint_path(session.principal, request.path)
            if request.background:
                session.saves.reserve()
            with session.lock:
                session.check_open()
                handle = session.optimizer.save_checkpoint(
                    path, blocking=not request.background, key=self.checkpoint_key
                )
            if not request.background:
                return pb.CheckpointReply(path=request.path, done=True)
            save_id = session.saves.add(request.path, handle)
        return pb.CheckpointReply(path=request.path, save_id=save_id, done=False)

    @_handled
    def WaitCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session:
            path, done = session.saves.wait(request.save_id, request.timeout_seconds)
        return pb.CheckpointReply(path=path, save_id=request.save_id, done=done)

    @_handled
    def LoadCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session:
            path = self._checkpoint_path(session.principal, request.path)
            with session.lock:
                session.optimizer.load_checkpoint(path, key=self.checkpoint_key)
                if self.store is not None:  # an LBFGS session's state is in its record
                    self.store.lbfgs_stepped(session)
        return pb.CheckpointReply(path=request.path)

    # ----- status -----------------------------------------------------------------------------

    @_handled
    def GetShardStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._use(context, request.session_id) as session:
            return pb.ShardStatusList(shards=shard_infos(session, with_ids=True))

    @_handled
    def ListSessions(self, request: Any, context: grpc.ServicerContext) -> Any:
        principal = _principal(context)
        operator = principal in self.operators
        if request.all_tenants and not operator and principal != ANONYMOUS:
            raise AccessDeniedError("only an operator's token may list every tenant's sessions")
        if operator and not request.all_tenants:
            raise ValueError("an operator holds no sessions: ask for all_tenants")
        mine = None if operator else principal  # without tokens, every session is anonymous's
        sessions = [session_info(s) for s in self.sessions.snapshot(mine)]
        return pb.SessionList(sessions=sessions)

    # ----- errors -----------------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, exc: BaseException) -> None:
        """Ends the call with ``exc``'s status and a message that names no server path."""
        abort(context, exc, self.checkpoint_dir)
