"""The gRPC gateway: shardopt's optimizer service for clients outside the Ray cluster.

Each session is a :class:`~shardopt.client.optimizer.ShardedOptimizer` living in the gateway process
(so the shards, the state_dict format and the all-or-nothing loads are [core]'s own) over
parameter tensors the gateway holds for the client. Clients push gradients, step and pull
parameters through ``protos/shardopt/v1/optimizer.proto``; sessions may be members of shard
groups (:mod:`shardopt.client.shard_group`). A session is visible only to the token that opened it, and
group names are scoped by the token too.

Every stream is checked before it changes anything (:class:`shardopt.core.wire.TensorReceiver`):
declared sizes against the limits before any allocation, chunks for order and size as they
arrive, and a session changes only when the whole stream has arrived. Errors map to one status
each through :data:`shardopt.core.errors.GRPC_STATUS`.

:func:`serve` wires the servicer with health checking, reflection, token auth, TLS and
message-size limits; :meth:`Gateway.stop` shuts down gracefully (NOT_SERVING, drain, stop).

Talks to: Ray (through the sessions' optimizers); clients over gRPC.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardopt.auth import TokenAuthInterceptor, bearer_token, principal_of
from shardopt.client.optimizer import ShardedOptimizer
from shardopt.core import wire
from shardopt.core.errors import ERROR_TYPE_KEY, GRPC_STATUS, ShardoptError
from shardopt.core.param_groups import group_options
from shardopt.core.proto import SERVICE_NAME, pb, rpc

logger = logging.getLogger(__name__)


OPTIMIZERS = {
    cls.__name__: cls
    for cls in vars(torch.optim).values()
    if isinstance(cls, type)
    and issubclass(cls, torch.optim.Optimizer)
    and cls not in (torch.optim.Optimizer, torch.optim.LBFGS)
}
"""What a client may ask for, by name: torch.optim's per-tensor classes (no imports by name)."""


@dataclass(frozen=True)
class Limits:
    """What one gateway accepts."""

    max_session_bytes: int = 8 << 30
    max_total_bytes: int = 32 << 30
    max_params: int = 100_000
    max_sessions: int = 1024
    state_factor: int = 4
    """A loaded state dict may declare up to this many times its session's parameter bytes."""


@dataclass
class _Session:
    session_id: str
    principal: str
    optimizer: ShardedOptimizer
    params: list[torch.Tensor]
    names: list[str]
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    grads_ready: bool = False
    steps: int = 0

    def expected(self, indices: list[int] | None = None) -> list[tuple[torch.dtype, tuple]]:
        chosen = self.params if indices is None else [self.params[i] for i in indices]
        return [(p.dtype, tuple(p.shape)) for p in chosen]


class _Malformed:
    """What a request that protobuf could not parse becomes (INVALID_ARGUMENT, not INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as err:
            return _Malformed(err)

    return parse


def _status_of(exc: BaseException) -> grpc.StatusCode:
    for kind, name in GRPC_STATUS.items():
        if isinstance(exc, kind):
            return getattr(grpc.StatusCode, name)
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = _status_of(exc)
    if isinstance(exc, wire.LimitError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("gateway: unexpected error", exc_info=exc)
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    context.set_trailing_metadata(((ERROR_TYPE_KEY, type(exc).__name__),))
    context.abort(code, message or type(exc).__name__)


def _handled(method: Callable) -> Callable:
    """Maps a servicer method's exceptions to statuses (also for streamed answers)."""

    @functools.wraps(method)
    def unary(self: OptimizerGateway, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                raise wire.WireError(f"malformed request: {request.error}")
            return method(self, request, context)
        except Exception as exc:
            _abort(context, exc)

    return unary


def _handled_stream(method: Callable) -> Callable:
    @functools.wraps(method)
    def stream(self: OptimizerGateway, request: Any, context: grpc.ServicerContext) -> Iterator:
        try:
            if isinstance(request, _Malformed):
                raise wire.WireError(f"malformed request: {request.error}")
            yield from method(self, request, context)
        except Exception as exc:
            _abort(context, exc)

    return stream


def _messages(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Malformed):
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
    groups, start = [], 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        groups.append(
            pb.ParamGroup(
                params=list(range(start, start + count)),
                options=wire.encode_options(group_options(group)),
            )
        )
        start += count
    return groups


class OptimizerGateway(rpc.OptimizerServiceServicer):
    """The servicer: sessions by id, each a ShardedOptimizer over tensors held here."""

    def __init__(
        self,
        limits: Limits | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_key: bytes | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.checkpoint_dir = pathlib.Path(checkpoint_dir).resolve() if checkpoint_dir else None
        self.checkpoint_key = checkpoint_key  # signs saves; loads need its signature
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._reserved = 0

    # ----- sessions ---------------------------------------------------------------------------

    def _session(self, context: grpc.ServicerContext, session_id: str) -> _Session:
        principal = principal_of(bearer_token(context.invocation_metadata()))
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.principal != principal:  # another token's: not found
            raise KeyError(f"no session {session_id!r}")
        return session

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise MemoryError(f"this gateway holds its limit of {len(self._sessions)} sessions")
            if self._reserved + nbytes > self.limits.max_total_bytes:
                raise MemoryError(
                    f"{nbytes} more parameter bytes would pass this gateway's limit of "
                    f"{self.limits.max_total_bytes} (in use: {self._reserved})"
                )
            self._reserved += nbytes

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    @_handled
    def OpenSession(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        principal = principal_of(bearer_token(context.invocation_metadata()))
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
        names = [s.name or f"params[{i}]" for i, s in enumerate(spec.params)]
        receiver = wire.TensorReceiver(
            list(spec.params), self.limits.max_session_bytes, what="parameter", names=names
        )
        nbytes = sum(wire.checked_spec(s, n)[2] for s, n in zip(spec.params, names))
        self._reserve(nbytes)
        try:
            params = _receive(receiver, requests)
            optimizer = self._make_optimizer(spec, optimizer_class, params, principal)
        except BaseException:
            self._release(nbytes)
            raise
        session = _Session(uuid.uuid4().hex, principal, optimizer, params, names, nbytes)
        with self._lock:
            self._sessions[session.session_id] = session
        logger.info(
            "session %s: %s over %d parameters (%d bytes), %d shards",
            session.session_id, spec.optimizer, len(params), nbytes, optimizer.num_shards,
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

    def _make_optimizer(
        self, spec: Any, optimizer_class: type, params: list[torch.Tensor], principal: str
    ) -> ShardedOptimizer:
        groups: list[dict[str, Any]]
        if spec.param_groups:
            seen: list[int] = []
            groups = []
            for g in spec.param_groups:
                if any(i >= len(params) for i in g.params):
                    raise ValueError(f"a param group names a parameter beyond {len(params)}")
                seen.extend(g.params)
                groups.append(
                    {"params": [params[i] for i in g.params], **wire.decode_options(g.options)}
                )
            if sorted(seen) != list(range(len(params))):
                raise ValueError("every parameter must be in exactly one param group")
        else:
            groups = [{"params": params}]
        kwargs: dict[str, Any] = wire.decode_options(spec.hyperparameters)
        if spec.HasField("group") and spec.group.name:
            g = spec.group
            kwargs.update(
                group=f"{principal[:16]}-{g.name}",  # a token never reaches another's group
                world_size=g.world_size,
                rank=g.rank,
                mode=g.mode or "sync",
                max_staleness=g.max_staleness if g.HasField("max_staleness") else None,
                placement=g.placement or None,
                shard_resources=dict(g.shard_resources) or None,
            )
            if g.timeout_seconds:
                kwargs["timeout"] = g.timeout_seconds
        return ShardedOptimizer(
            groups, optimizer_class, num_shards=spec.num_shards or None, **kwargs
        )

    @_handled
    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            session = self._session(context, request.session_id)
        except KeyError:
            return pb.CloseSessionReply(closed=False)
        with self._lock:
            self._sessions.pop(session.session_id, None)
        with session.lock:
            session.optimizer.close()
        self._release(session.nbytes)
        return pb.CloseSessionReply(closed=True)

    def close_all(self) -> None:
        """Closes every session (graceful shutdown)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.optimizer.close()
            self._release(session.nbytes)

    # ----- stepping ---------------------------------------------------------------------------

    @_handled
    def PushGradients(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        session = self._session(context, header.session_id)
        indices = list(header.params)
        if indices != sorted(set(indices)) or any(i >= len(session.params) for i in indices):
            raise ValueError("gradient indices must be increasing and name declared parameters")
        receiver = wire.TensorReceiver(
            list(header.grads),
            session.nbytes,
            expected=session.expected(indices),
            what="gradient",
            names=[session.names[i] for i in indices],
        )
        grads = _receive(receiver, requests)  # nothing is staged unless all of it arrived
        with session.lock:
            for p in session.params:
                p.grad = None
            for i, grad in zip(indices, grads):
                session.params[i].grad = grad
            session.grads_ready = True
        return pb.PushGradientsReply(bytes=receiver.bytes_received)

    @_handled
    def Step(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(context, request.session_id)
        with session.lock:
            if not session.grads_ready:
                raise ShardoptError("no gradients staged: call PushGradients before each Step")
            if request.param_groups:
                self._update_groups(session, request.param_groups)
            optimizer = session.optimizer
            try:
                optimizer.step()
            finally:
                for p in session.params:
                    p.grad = None
                session.grads_ready = False
            session.steps += 1
            reply = pb.StepReply(steps=session.steps, state_order=optimizer.backend.state_order)
            if optimizer.group is not None:
                for r in optimizer.group.last_push:
                    push = reply.pushes.add(shard=r.shard_index, read_version=r.read_version)
                    if r.applied_version is not None:
                        push.applied_version = r.applied_version
            return reply

    @_handled_stream
    def PullParameters(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        session = self._session(context, request.session_id)
        with session.lock:
            if session.optimizer.group is not None:
                session.optimizer.pull_params()
            snapshot = [p.detach().clone() for p in session.params]
        specs = [wire.spec_of(p, n) for p, n in zip(snapshot, session.names)]
        yield pb.PullParametersReply(header=pb.PullParametersHeader(params=specs))
        for chunk in wire.tensor_chunks(snapshot):
            yield pb.PullParametersReply(chunk=chunk)

    @_handled
    def PushParameters(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        session = self._session(context, header.session_id)
        receiver = wire.TensorReceiver(
            list(header.params), session.nbytes, expected=session.expected(),
            what="parameter", names=session.names,
        )  # fmt: skip
        values = _receive(receiver, requests)
        with session.lock, torch.no_grad():
            for p, v in zip(session.params, values):
                p.copy_(v)
            session.optimizer.push_params()
        return pb.PushParametersReply(bytes=receiver.bytes_received)

    # ----- param groups -----------------------------------------------------------------------

    def _update_groups(self, session: _Session, groups: Any) -> None:
        optimizer = session.optimizer
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(
                f"{len(groups)} param groups given, the optimizer has {len(optimizer.param_groups)}"
            )
        decoded = [wire.decode_options(g.options) for g in groups]
        for g, (new, old) in enumerate(zip(groups, _encode_groups(optimizer))):
            if list(new.params) and list(new.params) != list(old.params):
                raise ValueError(f"param group {g}: its parameters cannot change")
        if any("params" in options or "param_names" in options for options in decoded):
            raise ValueError("param group options cannot set 'params' or 'param_names'")
        for group, options in zip(optimizer.param_groups, decoded):
            group.update(options)

    @_handled
    def GetParamGroups(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(context, request.session_id)
        with session.lock:
            return pb.ParamGroups(param_groups=_encode_groups(session.optimizer))

    @_handled
    def UpdateParamGroups(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(context, request.session_id)
        with session.lock:
            self._update_groups(session, request.param_groups)
            return pb.ParamGroups(param_groups=_encode_groups(session.optimizer))

    @_handled
    def AddParamGroup(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        session = self._session(context, header.session_id)
        if len(session.params) + len(header.params) > self.limits.max_params:
            raise wire.LimitError(f"more than {self.limits.max_params} parameters")
        start = len(session.params)
        names = [s.name or f"params[{start + i}]" for i, s in enumerate(header.params)]
        receiver = wire.TensorReceiver(
            list(header.params), self.limits.max_session_bytes - session.nbytes,
            what="parameter", names=names,
        )  # fmt: skip
        nbytes = sum(wire.checked_spec(s, n)[2] for s, n in zip(header.params, names))
        self._reserve(nbytes)
        try:
            values = _receive(receiver, requests)
            options = wire.decode_options(header.group.options)
            with session.lock:
                session.optimizer.add_param_group({**options, "params": values})
                session.params.extend(values)
                session.names.extend(names)
                session.nbytes += nbytes
        except BaseException:
            self._release(nbytes)
            raise
        return pb.ParamGroups(param_groups=_encode_groups(session.optimizer))

    # ----- state dicts and checkpoints --------------------------------------------------------

    @_handled_stream
    def GetStateDict(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        session = self._session(context, request.session_id)
        with session.lock:
            state_dict = session.optimizer.state_dict()
        if request.params:
            wanted = set(request.params)
            state_dict["state"] = {k: v for k, v in state_dict["state"].items() if k in wanted}
        tensors: list[torch.Tensor] = []
        structure = wire.encode_value(state_dict, tensors)
        header = pb.StateDictHeader(
            state_dict=structure, tensors=[wire.spec_of(t) for t in tensors]
        )
        yield pb.StateDictMessage(header=header)
        for chunk in wire.tensor_chunks(tensors):
            yield pb.StateDictMessage(chunk=chunk)

    @_handled
    def LoadStateDict(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _messages(requests)
        header = _first(requests, "header")
        session = self._session(context, header.session_id)
        limit = self.limits.state_factor * session.nbytes + (1 << 20)
        receiver = wire.TensorReceiver(list(header.tensors), limit, what="state tensor")
        tensors = _receive(receiver, requests)
        state_dict = wire.decode_value(header.state_dict, tensors)
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError("a state dict is a dict with exactly 'state' and 'param_groups'")
        with session.lock:
            session.optimizer.load_state_dict(state_dict)
            return pb.LoadStateDictReply(state_order=session.optimizer.backend.state_order)

    def _checkpoint_path(self, relative: str) -> pathlib.Path:
        if self.checkpoint_dir is None:
            raise PermissionError("this gateway has no checkpoint directory (--checkpoint-dir)")
        path = pathlib.PurePosixPath(relative)
        if not relative or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"checkpoint path {relative!r} must be relative, without '..'")
        return self.checkpoint_dir / path

    @_handled
    def SaveCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(context, request.session_id)
        path = self._checkpoint_path(request.path)
        with session.lock:
            session.optimizer.save_checkpoint(path, key=self.checkpoint_key)
        return pb.CheckpointReply(path=request.path)

    @_handled
    def LoadCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = self._session(context, request.session_id)
        path = self._checkpoint_path(request.path)
        with session.lock:
            session.optimizer.load_checkpoint(path, key=self.checkpoint_key)
        return pb.CheckpointReply(path=request.path)


def _method_handlers(servicer: OptimizerGateway) -> grpc.GenericRpcHandler:
    """The service's handlers, with parsers that turn unparseable bytes into INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["OptimizerService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class Gateway:
    """A running gateway: its port, and a graceful :meth:`stop`."""

    def __init__(
        self, server: grpc.Server, servicer: OptimizerGateway, health_servicer: Any, port: int
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.port = port

    def stop(self, grace: float = 10.0) -> None:
        """Health NOT_SERVING, then in-flight calls get ``grace`` seconds, then sessions close."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.servicer.close_all()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tokens: list[str] | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_key: bytes | None = None,
    limits: Limits | None = None,
    max_workers: int = 64,
) -> Gateway:
    """Starts the gateway (Ray must be reachable: :func:`shardopt.client.runtime.ensure_ray`).

    Args:
        host, port: where to listen (port 0: any free port, see ``Gateway.port``).
        tokens: accepted bearer tokens; None serves without authentication.
        tls_cert, tls_key: PEM files for TLS; without them the port is plaintext.
        checkpoint_dir: where Save/LoadCheckpoint paths live (None: refused).
        checkpoint_key: HMAC key (:func:`shardopt.checkpoint.integrity.read_key`) that signs
            every checkpoint saved; LoadCheckpoint then loads only checkpoints signed with it.
            None: checkpoints are checksummed, not signed, and any intact one loads.
        limits: size limits (defaults: :class:`Limits`).
        max_workers: threads serving calls (sync group steps hold one each while waiting).

    Returns:
        The running :class:`Gateway`.
    """
    from shardopt.client.runtime import ensure_ray

    ensure_ray()
    servicer = OptimizerGateway(limits, checkpoint_dir, checkpoint_key)
    interceptors = [TokenAuthInterceptor(tokens)] if tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shardopt-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", wire.MESSAGE_LIMIT),
            ("grpc.max_send_message_length", wire.MESSAGE_LIMIT),
        ],
    )
    server.add_generic_rpc_handlers((_method_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        credentials = grpc.ssl_server_credentials(
            [(pathlib.Path(tls_key).read_bytes(), pathlib.Path(tls_cert).read_bytes())]
        )
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if not tokens:
        logger.warning("gateway on %s:%d serves WITHOUT authentication", host, bound)
    if checkpoint_dir and checkpoint_key is None:
        logger.warning(
            "gateway checkpoints are checksummed but not signed (no --checkpoint-key-file): "
            "LoadCheckpoint loads any intact checkpoint under %s",
            checkpoint_dir,
        )
    logger.info("gateway serving on %s:%d", host, bound)
    return Gateway(server, servicer, health_servicer, bound)
