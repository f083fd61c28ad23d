"""The remote proxy's transport: a :class:`~shardopt.optimizer.ShardedOptimizer` created with
``address="host:port"`` talks to a gateway (:mod:`shardopt.gateway`) over gRPC instead of Ray.

The proxy keeps the user's ``param_groups`` as always; :class:`RemoteClient` opens a session
with their specs and values, and each step pushes the gradients, steps (sending the current
group options, so lr schedulers work) and pulls the parameters back into the user's tensors.
State dicts travel as value trees plus chunked tensors (:mod:`shardopt.wire`). A server error
comes back as the exception type the server raised (``ValueError``, ``TypeError``,
:class:`~shardopt.errors.GroupTimeoutError`, ...), with the server's message.

Talks to: a gateway over gRPC (no Ray in this process).
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import torch

from shardopt import errors, wire
from shardopt.groups import group_options
from shardopt.plan import ShardPlan
from shardopt.proto import pb, rpc
from shardopt.records import GroupConfig

if TYPE_CHECKING:
    from shardopt.optimizer import ShardedOptimizer

logger = logging.getLogger(__name__)

_ERROR_TYPES: dict[str, type[BaseException]] = {
    **{
        name: getattr(builtins, name)
        for name in (
            "ValueError", "TypeError", "KeyError", "IndexError", "FileNotFoundError",
            "PermissionError", "MemoryError", "NotImplementedError", "RuntimeError",
        )
    },
    **{
        cls.__name__: cls
        for cls in (
            errors.GroupTimeoutError, errors.ShardUnavailableError,
            errors.OptimizerClosedError, errors.PlacementError, errors.QuotaExceededError,
            errors.ShardoptError,
        )
    },
}  # fmt: skip
_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: ValueError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QuotaExceededError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.GroupTimeoutError,
    grpc.StatusCode.UNAVAILABLE: errors.ShardUnavailableError,
}


def raised(err: grpc.RpcError) -> BaseException:
    """The exception a failed call stands for: the server's type where it said, else by status."""
    name = dict(err.trailing_metadata() or ()).get(errors.ERROR_TYPE_KEY)
    kind = _ERROR_TYPES.get(name) or _BY_STATUS.get(err.code(), errors.ShardoptError)
    message = err.details() or str(err.code())
    if kind is KeyError and "session" in message:
        kind = errors.OptimizerClosedError
    return kind(message)


def group_request(
    name: str | None, rank: int | None, config: GroupConfig | None
) -> dict[str, Any] | None:
    """A shard group's options as the gateway's ``GroupOptions`` fields (None: no group).

    Placement is not among them: the gateway's operator decides it.
    """
    if name is None or config is None:
        return None
    options: dict[str, Any] = {
        "name": name,
        "world_size": config.world_size,
        "rank": rank,
        "mode": config.mode,
        "timeout_seconds": config.timeout_s,
    }
    if config.max_staleness is not None:
        options["max_staleness"] = config.max_staleness
    return options


def _channel(address: str, tls: bool | str | os.PathLike | None) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", wire.MESSAGE_LIMIT),
        ("grpc.max_send_message_length", wire.MESSAGE_LIMIT),
    ]
    if not tls:
        return grpc.insecure_channel(address, options=options)
    roots = None if tls is True else open(tls, "rb").read()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)


class RemoteClient:
    """One session on a gateway.

    Args:
        address: the gateway's ``host:port``.
        token: the bearer token (None: the gateway runs without authentication).
        tls: False/None for plaintext, True for TLS with the system's roots, or the path of a
            PEM file of root certificates (e.g. a self-signed server certificate).
    """

    def __init__(
        self, address: str, token: str | None = None, tls: bool | str | os.PathLike | None = None
    ) -> None:
        self.address = address
        self._channel = _channel(address, tls)
        self._stub = rpc.OptimizerServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.session_id: str | None = None
        self.last_steps = 0
        self.last_pushes: list[Any] = []

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise raised(err) from None

    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from getattr(self._stub, method)(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise raised(err) from None

    # ----- the session ------------------------------------------------------------------------

    def open(
        self, proxy: ShardedOptimizer, num_shards: int | None, group: dict[str, Any] | None
    ) -> Any:
        """Opens the session with the proxy's parameters and groups; returns the Session."""
        params = proxy._flat_params()
        names = []
        for g in proxy.param_groups:
            names.extend(g.get("param_names") or [""] * len(g["params"]))
        spec = pb.SessionSpec(
            optimizer=proxy.optimizer_class.__name__,
            hyperparameters=wire.encode_options(proxy._shard_defaults),
            params=[wire.spec_of(p, n) for p, n in zip(params, names)],
            num_shards=num_shards or 0,
        )
        start = 0
        for g in proxy.param_groups:
            count = len(g["params"])
            spec.param_groups.add(
                params=list(range(start, start + count)),
                options=wire.encode_options(group_options(g)),
            )
            start += count
        if group is not None:
            spec.group.CopyFrom(pb.GroupOptions(**group))
        messages = [pb.OpenSessionRequest(spec=spec)]

        def requests() -> Iterator[Any]:
            yield from messages
            for chunk in wire.tensor_chunks(params):
                yield pb.OpenSessionRequest(chunk=chunk)

        session = self._call("OpenSession", requests())
        self.session_id = session.session_id
        proxy._state_order = dict.fromkeys(session.state_order)
        self.pull(proxy)  # a group member adopts the group's values
        return session

    def plan(self, session: Any, proxy: ShardedOptimizer) -> ShardPlan:
        loads = [0] * session.num_shards
        for p, owner in zip(proxy._flat_params(), session.owners):
            loads[owner] += p.numel() * p.element_size()
        return ShardPlan(owners=tuple(session.owners), shard_bytes=tuple(loads))

    def close(self) -> None:
        if self.session_id is not None:
            try:
                self._call("CloseSession", pb.SessionRef(session_id=self.session_id))
            except Exception as err:  # the gateway is gone: nothing left to close
                logger.debug("closing session %s: %s", self.session_id, err)
            self.session_id = None
        self._channel.close()

    # ----- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, proxy: ShardedOptimizer, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = proxy._flat_params()
        if any(proxy._versions[i] != (p._version, p.data_ptr()) for i, p in enumerate(params)):
            self.push_params(proxy)  # changed in place since the last step (as the Ray path)
        indices, grads = [], []
        for i, p in enumerate(params):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise NotImplementedError("sparse gradients are not served over gRPC yet")
                indices.append(i)
                grads.append(p.grad)
        header = pb.PushGradientsHeader(
            session_id=self.session_id, params=indices, grads=[wire.spec_of(g) for g in grads]
        )

        def requests() -> Iterator[Any]:
            yield pb.PushGradientsRequest(header=header)
            for chunk in wire.tensor_chunks(grads):
                yield pb.PushGradientsRequest(chunk=chunk)

        self._call("PushGradients", requests())
        groups = [
            pb.ParamGroup(options=wire.encode_options(group_options(g))) for g in proxy.param_groups
        ]
        reply = self._call("Step", pb.StepRequest(session_id=self.session_id, param_groups=groups))
        self.last_steps, self.last_pushes = reply.steps, list(reply.pushes)
        proxy._state_order = dict.fromkeys(reply.state_order)
        self.pull(proxy)
        return loss

    @torch.no_grad()
    def pull(self, proxy: ShardedOptimizer) -> None:
        """Copies the gateway's current parameters into the proxy's tensors."""
        params = proxy._flat_params()
        answers = self._stream(
            "PullParameters", pb.PullParametersRequest(session_id=self.session_id)
        )
        first = next(answers)
        expected = [(p.dtype, tuple(p.shape)) for p in params]
        receiver = wire.TensorReceiver(
            list(first.header.params), sum(p.numel() * p.element_size() for p in params),
            expected=expected, what="parameter",
        )  # fmt: skip
        for answer in answers:
            receiver.add(answer.chunk)
        for p, value in zip(params, receiver.finish()):
            p.copy_(value)
            proxy._record_version(proxy._param_id(p), p)

    @torch.no_grad()
    def push_params(self, proxy: ShardedOptimizer) -> None:
        params = proxy._flat_params()
        header = pb.PushParametersHeader(
            session_id=self.session_id, params=[wire.spec_of(p) for p in params]
        )

        def requests() -> Iterator[Any]:
            yield pb.PushParametersRequest(header=header)
            for chunk in wire.tensor_chunks(params):
                yield pb.PushParametersRequest(chunk=chunk)

        self._call("PushParameters", requests())
        for p in params:
            proxy._record_version(proxy._param_id(p), p)

    def add_param_group(self, proxy: ShardedOptimizer, group: dict[str, Any]) -> None:
        header = pb.AddParamGroupHeader(
            session_id=self.session_id,
            group=pb.ParamGroup(options=wire.encode_options(group_options(group))),
            params=[wire.spec_of(p) for p in group["params"]],
        )

        def requests() -> Iterator[Any]:
            yield pb.AddParamGroupRequest(header=header)
            for chunk in wire.tensor_chunks(list(group["params"])):
                yield pb.AddParamGroupRequest(chunk=chunk)

        self._call("AddParamGroup", requests())

    # ----- state ------------------------------------------------------------------------------

    def state(self, param_ids: list[int] | None = None) -> dict[int, Any]:
        """The optimizer state by parameter id (all of it, or only ``param_ids``)."""
        request = pb.GetStateDictRequest(session_id=self.session_id, params=param_ids or [])
        answers = self._stream("GetStateDict", request)
        header = next(answers).header
        receiver = wire.TensorReceiver(list(header.tensors), 1 << 62, what="state tensor")
        for answer in answers:
            receiver.add(answer.chunk)
        return wire.decode_value(header.state_dict, receiver.finish())["state"]

    def load_state_dict(self, proxy: ShardedOptimizer, state_dict: dict[str, Any]) -> None:
        tensors: list[torch.Tensor] = []
        structure = wire.encode_value(state_dict, tensors)
        header = pb.StateDictHeader(
            session_id=self.session_id,
            state_dict=structure,
            tensors=[wire.spec_of(t) for t in tensors],
        )

        def requests() -> Iterator[Any]:
            yield pb.StateDictMessage(header=header)
            for chunk in wire.tensor_chunks(tensors):
                yield pb.StateDictMessage(chunk=chunk)

        reply = self._call("LoadStateDict", requests())
        proxy._state_order = dict.fromkeys(reply.state_order)

    def save_checkpoint(self, path: str) -> None:
        self._call("SaveCheckpoint", pb.CheckpointRequest(session_id=self.session_id, path=path))

    def load_checkpoint(self, path: str) -> None:
        self._call("LoadCheckpoint", pb.CheckpointRequest(session_id=self.session_id, path=path))
