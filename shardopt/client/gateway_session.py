"""The gateway backend: a :class:`~shardopt.client.optimizer.ShardedOptimizer` created with
``address="host:port"`` talks to a gateway (:mod:`shardopt.gateway`) over gRPC instead of Ray.

The proxy keeps the user's ``param_groups`` as always; :class:`GatewaySession` opens a session
with their specs and values, and each step pushes the gradients, steps (sending the current
group options, so lr schedulers work) and pulls the parameters back into the user's tensors.
State dicts travel as value trees plus chunked tensors (:mod:`shardopt.core.wire`). A server error
comes back as the exception type the server raised (``ValueError``, ``TypeError``,
:class:`~shardopt.core.errors.GroupTimeoutError`, ...), with the server's message. A call that
finds no gateway (UNAVAILABLE, not sent by a server) is tried again with backoff for
``reconnect_s``; each step carries its id, so a step tried again after its answer was lost is
applied once (its gradients pushed again: a restarted gateway has none; in a shard group a
sync push is matched by version, an async one by the step's id). An LBFGS step
(``ClosureStep``) only while the gateway has asked for no evaluation; a pull another call
overtook (``PullConflictError``) at once, a few times (one policy: ``_retrying``).

Talks to: a gateway over gRPC (this process joins no Ray cluster).
"""

from __future__ import annotations

import builtins
import datetime
import logging
import os
import queue
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch
from torch.autograd.graph import increment_version

from shardopt.checkpoint.format import SaveHandle
from shardopt.client.backend import Backend, ParamSource
from shardopt.client.shard_map import ShardMap
from shardopt.core import chunk_codec, errors, wire
from shardopt.core.amp import AmpScaling
from shardopt.core.param_groups import lay_out_state
from shardopt.core.proto import pb
from shardopt.core.records import ShardStatus

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
            errors.OptimizerClosedError, errors.PlacementError, errors.CheckpointInUseError,
            errors.QuotaExceededError, errors.PartialStepError, errors.AccessDeniedError,
            errors.PullConflictError, errors.ShardoptError,
        )
    },
}  # fmt: skip
_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: ValueError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QuotaExceededError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionError,
    grpc.StatusCode.PERMISSION_DENIED: errors.AccessDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.GroupTimeoutError,
    grpc.StatusCode.UNAVAILABLE: errors.ShardUnavailableError,
}


def error_type(err: grpc.RpcError) -> str | None:
    """The name of the exception type the server said a failed call raised (None: it did not)."""
    return dict(err.trailing_metadata() or ()).get(errors.ERROR_TYPE_KEY)


def raised(err: grpc.RpcError) -> BaseException:
    """The exception a failed call stands for: the server's type where it said, else by status."""
    name = error_type(err)
    kind = _ERROR_TYPES.get(name) or _BY_STATUS.get(err.code(), errors.ShardoptError)
    message = err.details() or str(err.code())
    if kind is KeyError and "session" in message:
        kind = errors.OptimizerClosedError
    return kind(message)


def open_channel(address: str, tls: bool | str | os.PathLike | None) -> grpc.Channel:
    """A channel to a gateway: plaintext, or TLS (True: the system's roots; a path: a PEM of root
    certificates), with the wire format's message limits. It tries to reconnect to a gateway
    that went away within a second (gRPC's default backs off to two minutes)."""
    options = [
        ("grpc.max_receive_message_length", wire.MESSAGE_LIMIT),
        ("grpc.max_send_message_length", wire.MESSAGE_LIMIT),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if not tls:
        return grpc.insecure_channel(address, options=options)
    roots = None if tls is True else open(tls, "rb").read()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)


PULL_ATTEMPTS = 5
"""How often a pull is tried when the gateway's parameters keep changing while they stream
(another thread of the client stepping meanwhile)."""


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` (an in-place write autograd sees), by one plain memcpy where the
    tensors allow it (:func:`~shardopt.core.chunk_codec.copy_bytes`)."""
    if chunk_codec.copy_fast(param, value):
        increment_version(param)


def gradients_of(params: list[torch.Tensor], dense: bool = False) -> tuple[Any, list[Any]]:
    """A ``PushGradientsHeader`` for the gradients of ``params`` (no session id) and the tensors
    whose bytes follow it: the dense gradients, then each sparse one's indices and values
    (coalesced). With ``dense``, sparse gradients are sent dense (a closure's evaluation)."""
    dense_ids, dense_grads, sparse_ids, sparse_tensors = [], [], [], []
    for i, p in enumerate(params):
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse and not dense:
            grad = grad.coalesce()
            sparse_ids.append(i)
            sparse_tensors.extend([grad.indices(), grad.values()])
        else:
            dense_ids.append(i)
            dense_grads.append(grad.to_dense() if grad.is_sparse else grad)
    header = pb.PushGradientsHeader(
        params=dense_ids,
        grads=[wire.spec_of(g) for g in dense_grads],
        sparse_params=sparse_ids,
        sparse_tensors=[wire.spec_of(t) for t in sparse_tensors],
    )
    return header, dense_grads + sparse_tensors


def reconnectable(err: grpc.RpcError) -> bool:
    """Whether a failed call met no gateway (UNAVAILABLE without the server's error type: gone,
    restarting, or the connection broke), so that the same call may be tried again."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and error_type(err) is None


def _no_key_over_grpc(key: bytes | None) -> None:
    if key is not None:
        raise ValueError(
            "over gRPC, the gateway signs and checks checkpoints with its own key "
            "(shardopt serve --checkpoint-key-file)"
        )


def _close_session(
    channel: grpc.Channel, stub: Any, metadata: Any, session: dict[str, str | None]
) -> None:
    """Closes a session and its channel (by close(), or when its optimizer is collected)."""
    if session["id"] is not None:
        try:
            stub.CloseSession(pb.SessionRef(session_id=session["id"]), metadata=metadata)
        except Exception as err:  # the gateway is gone: nothing left to close
            logger.debug("closing session %s: %s", session["id"], err)
        session["id"] = None
    channel.close()


class GatewaySession(Backend):
    """One session on a gateway.

    Args:
        params: the proxy's parameters.
        address: the gateway's ``host:port``.
        token: the bearer token (None: the gateway runs without authentication).
        tls: False/None for plaintext, True for TLS with the system's roots, or the path of a
            PEM file of root certificates (e.g. a self-signed server certificate).
        num_shards: the shards asked for (None: the gateway decides).
        group: a shard group's options (see :func:`~shardopt.client.group_config.group_request`)
            or None.
        reconnect_s: how long a call retries, with backoff, while no gateway answers (a
            gateway restarting with ``--session-store`` resumes the session); 0: never.
    """

    kind = "gateway"

    def __init__(
        self,
        params: ParamSource,
        address: str,
        token: str | None,
        tls: bool | str | os.PathLike | None,
        num_shards: int | None,
        group: dict[str, Any] | None,
        reconnect_s: float | datetime.timedelta = 0.0,
    ) -> None:
        self._params = params
        if isinstance(reconnect_s, datetime.timedelta):
            reconnect_s = reconnect_s.total_seconds()
        if not isinstance(reconnect_s, (int, float)) or reconnect_s < 0:
            raise ValueError(f"Invalid reconnect_timeout: {reconnect_s!r} (seconds >= 0)")
        self._reconnect_s = float(reconnect_s)
        self._group = group
        self._next_step = 0  # the id of the next step: a repeat after a lost answer reuses it
        self.address = address
        self._channel = open_channel(address, tls)
        self._stub = chunk_codec.stub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._span_metadata = self._metadata + chunk_codec.SPANNING
        self._push_spans = False  # whether the gateway said its pushes take spanning chunks
        self._session: dict[str, str | None] = {"id": None}
        self._finalizer = weakref.finalize(
            self, _close_session, self._channel, self._stub, self._metadata, self._session
        )
        self.last_pushes: list[Any] = []
        self._pulled: list[torch.Tensor] = []
        # LBFGS evaluates its closure within the step: the gateway asks for it (ClosureStep)
        self._closure_steps = issubclass(params.optimizer_class, torch.optim.LBFGS)
        self._open(num_shards, group)

    def _call(self, method: Callable[..., Any], request: Any, retry: bool = True) -> Any:
        """One call; ``request`` is a message or a function making the request stream (called
        again for each try). Retried while no gateway answers (see :meth:`_retrying`)."""
        make = request if callable(request) else lambda: request
        if not retry:
            return self._retrying(lambda: method(make(), metadata=self._metadata), 0.0)
        return self._retrying(lambda: method(make(), metadata=self._metadata))

    def _retrying(
        self, attempt: Callable[[], Any], window_s: float | None = None, conflicts: int = 0
    ) -> Any:
        """``attempt()`` under the client's one retry policy: tried again with backoff while it
        fails for want of a gateway, for at most ``window_s`` (default: ``reconnect_s``), and
        tried again at once, at most ``conflicts`` times, when the gateway refused it because
        another call overtook it (:class:`~shardopt.core.errors.PullConflictError`); then (or
        on any other error) raises the server's exception (:func:`raised`)."""
        window_s = self._reconnect_s if window_s is None else window_s
        deadline = time.monotonic() + window_s
        delay = 0.05
        while True:
            try:
                return attempt()
            except grpc.RpcError as err:
                if conflicts > 0 and error_type(err) == errors.PullConflictError.__name__:
                    conflicts -= 1  # another call changed the parameters mid-stream
                    continue
                if not reconnectable(err) or time.monotonic() + delay > deadline:
                    raise raised(err) from None
                log = logger.warning if delay == 0.05 else logger.debug  # once per outage
                log("gateway %s unavailable (%s); retrying", self.address, err.details())
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        try:
            yield from method(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise raised(err) from None

    # ----- the session ------------------------------------------------------------------------

    def _open(self, num_shards: int | None, group: dict[str, Any] | None) -> None:
        """Opens the session with the proxy's parameters and groups."""
        params = self._params.flat()
        names = []
        for g in self._params.groups:
            names.extend(g.get("param_names") or [""] * len(g["params"]))
        spec = pb.SessionSpec(
            optimizer=self._params.optimizer_class.__name__,
            hyperparameters=wire.encode_options(self._params.defaults),
            params=[wire.spec_of(p, n) for p, n in zip(params, names)],
            num_shards=num_shards or 0,
            default_dtype=wire.WIRE_DTYPES[self._params.default_dtype],
        )
        spec.param_groups.extend(wire.encode_groups(self._params.groups))
        if group is not None:
            spec.group.CopyFrom(pb.GroupOptions(**group))
        messages = [pb.OpenSessionRequest(spec=spec)]

        def requests() -> Iterator[Any]:
            yield from messages
            yield from chunk_codec.encoded_chunks(params)

        # sent once (a second open would hold a second session), so first wait, up to
        # reconnect_s, for a connection: a channel whose last try met no gateway (or that shares
        # gRPC's subchannel with one that did) fails a call at once until its backoff ends
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=self._reconnect_s)
        except grpc.FutureTimeoutError:
            ready.cancel()  # (it would watch the channel until it connects)
        session = self._call(self._stub.OpenSession, requests, retry=False)
        self._session["id"] = session.session_id
        self.shard_map = ShardMap.with_owners(session.num_shards, tuple(session.owners), params)
        self.shard_map.set_state_order(session.state_order)
        self.pull_params()  # a group member adopts the group's values

    @property
    def session_id(self) -> str | None:
        return self._session["id"]

    def close(self) -> None:
        self._finalizer()

    # ----- stepping and parameters ------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None, scaling: AmpScaling | None) -> Any:
        if self._closure_steps:
            return self._closure_step(closure)
        loss = self._params.evaluate(closure)
        if scaling is not None and not self._params.unscale_here(scaling):  # skipped, as
            if self._group is not None and self._group["mode"] == "sync":  # scaler.step does
                skip = pb.StepRequest(
                    session_id=self.session_id, step_id=self._next_step, skip=True
                )
                reply = self._retrying(lambda: self._stub.Step(skip, metadata=self._metadata))
                self._next_step += 1  # (the round waited for this member's vote)
                self.last_pushes = list(reply.pushes)
            return loss
        params = self._params.flat()
        if self.shard_map.any_changed(params):
            self.push_params()  # changed in place since the last step (as the Ray path)
        header, tensors = gradients_of(params)
        header.session_id = self.session_id

        spans = self._push_spans  # (the gateway said so in the last pull's metadata)
        encode = chunk_codec.spanning_chunks if spans else chunk_codec.encoded_chunks

        def requests() -> Iterator[Any]:
            yield pb.PushGradientsRequest(header=header)
            yield from encode(tensors)

        groups = wire.encode_groups(self._params.groups, with_ids=False)
        step = pb.StepRequest(
            session_id=self.session_id, param_groups=groups, step_id=self._next_step
        )

        def push_and_step() -> Any:  # the gradients again with each try: a new gateway has none
            self._stub.PushGradients(
                requests(), metadata=self._span_metadata if spans else self._metadata
            )
            return self._stub.Step(step, metadata=self._metadata)

        reply = self._retrying(push_and_step)  # (async too: each push carries the step's id)
        self._next_step += 1
        self.last_pushes = list(reply.pushes)
        self.shard_map.set_state_order(reply.state_order)
        self.pull_params()
        return loss

    @torch.no_grad()
    def pull_params(self) -> None:
        """Copies the gateway's current parameters into the proxy's tensors."""
        params = self._params.flat()
        staging = self._staging(params)  # a pull that fails part-way leaves params as they were
        request = pb.PullParametersRequest(session_id=self.session_id)

        def attempt() -> list[torch.Tensor]:
            answers = self._stub.PullParameters(request, metadata=self._span_metadata)
            values = chunk_codec.receive_parameters(answers, staging)
            said = getattr(answers, "initial_metadata", None)  # (any iterator of answers will do)
            self._push_spans = said is not None and chunk_codec.asks_spanning(said())
            return values

        values = self._retrying(attempt, conflicts=PULL_ATTEMPTS - 1)
        for pid, (p, value) in enumerate(zip(params, values)):
            assign(p, value)
            self.shard_map.record(pid, p)

    def _staging(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped as ``params`` that pulls receive into, allocated once and reused."""
        shapes = [(p.dtype, tuple(p.shape)) for p in params]
        if [(t.dtype, tuple(t.shape)) for t in self._pulled] != shapes:
            self._pulled = [torch.empty(shape, dtype=dtype) for dtype, shape in shapes]
        return self._pulled

    @torch.no_grad()
    def push_params(self) -> None:
        params = self._params.flat()
        header = pb.PushParametersHeader(
            session_id=self.session_id, params=[wire.spec_of(p) for p in params]
        )

        def requests() -> Iterator[Any]:
            yield pb.PushParametersRequest(header=header)
            yield from chunk_codec.encoded_chunks(params)

        self._call(self._stub.PushParameters, requests)
        for pid, p in enumerate(params):
            self.shard_map.record(pid, p)

    def add_param_group(self, group_index: int) -> None:
        group = self._params.groups[group_index]
        new_params = list(group["params"])
        header = pb.AddParamGroupHeader(
            session_id=self.session_id,
            group=wire.encode_groups([group], with_ids=False)[0],
            params=[wire.spec_of(p) for p in new_params],
        )

        def requests() -> Iterator[Any]:
            yield pb.AddParamGroupRequest(header=header)
            yield from chunk_codec.encoded_chunks(new_params)

        self._call(self._stub.AddParamGroup, requests, retry=False)
        # the gateway's session places them with the same deterministic plan
        first = len(self.shard_map.plan.owners)
        extended = self.shard_map.plan.extended([p.numel() * p.element_size() for p in new_params])
        self.shard_map.adopt(extended.owners[first:], new_params)

    # ----- state ------------------------------------------------------------------------------

    def state_parts(self, param_ids: tuple[int, ...] | None = None) -> Iterator[dict[int, Any]]:
        request = pb.GetStateDictRequest(session_id=self.session_id, params=param_ids or [])
        answers = self._stream(self._stub.GetStateDict, request)
        header = next(answers).header
        receiver = wire.TensorReceiver(list(header.tensors), 1 << 62, what="state tensor")
        for answer in answers:
            receiver.add(answer.chunk)
        state = wire.decode_value(header.state_dict, receiver.finish())["state"]
        params = self._params.flat()  # laid out as torch's state of each parameter is
        known = range(len(params))
        yield {
            pid: lay_out_state(value, params[pid]) if pid in known else value
            for pid, value in state.items()
        }

    def load_state(self, state: dict[int, dict[str, Any]], options: tuple[dict, ...]) -> None:
        groups, start = [], 0
        for group, group_opts in zip(self._params.groups, options):
            count = len(group["params"])
            groups.append({**group_opts, "params": list(range(start, start + count))})
            start += count
        tensors: list[torch.Tensor] = []
        structure = wire.encode_value({"state": state, "param_groups": groups}, tensors)
        header = pb.StateDictHeader(
            session_id=self.session_id,
            state_dict=structure,
            tensors=[wire.spec_of(t) for t in tensors],
        )

        def requests() -> Iterator[Any]:
            yield pb.StateDictMessage(header=header)
            yield from chunk_codec.encoded_chunks(tensors)

        reply = self._call(self._stub.LoadStateDict, requests)
        self.shard_map.set_state_order(reply.state_order)

    def set_param_state(self, pid: int, value: dict[str, Any]) -> None:
        state = next(self.state_parts())
        state[pid] = value
        self.load_state(state, self._params.options())

    # ----- checkpoints and status -------------------------------------------------------------

    def save_checkpoint(self, path: str, blocking: bool, key: bytes | None) -> SaveHandle:
        """Saves on the gateway; ``blocking=False`` returns once the shards are writing, and
        the handle's ``done()`` (which commits a save found written) and ``wait()`` ask the
        gateway (WaitCheckpoint)."""
        _no_key_over_grpc(key)
        request = pb.CheckpointRequest(
            session_id=self.session_id, path=path, background=not blocking
        )
        save_id = self._call(self._stub.SaveCheckpoint, request).save_id
        if blocking:
            return SaveHandle.committed()
        committed = [False]

        def ask(timeout_s: float) -> bool:
            if not committed[0]:
                wait = pb.WaitCheckpointRequest(
                    session_id=self.session_id, save_id=save_id, timeout_seconds=timeout_s
                )
                committed[0] = self._call(self._stub.WaitCheckpoint, wait).done
            return committed[0]

        def finish() -> None:
            while not ask(30.0):
                pass

        return SaveHandle(lambda: ask(0.0), finish)

    def load_checkpoint(self, path: str, key: bytes | None) -> list[dict[str, Any]]:
        _no_key_over_grpc(key)
        request = pb.CheckpointRequest(session_id=self.session_id, path=path)
        self._call(self._stub.LoadCheckpoint, request)
        self.shard_map.set_state_order(self._state_ids())
        reply = self._call(self._stub.GetParamGroups, pb.SessionRef(session_id=self.session_id))
        groups = []
        for mine, saved in zip(self._params.groups, reply.param_groups):
            options = wire.decode_options(saved.options)  # a map: the saved order is lost
            order = [k for k in mine if k in options] + [k for k in options if k not in mine]
            groups.append({**{k: options[k] for k in order}, "params": list(saved.params)})
        return groups

    def _state_ids(self) -> list[int]:
        return list(next(self.state_parts()))

    def status(self) -> list[ShardStatus]:
        reply = self._call(self._stub.GetShardStatus, pb.SessionRef(session_id=self.session_id))
        return [
            ShardStatus(
                shard_index=s.shard, device=s.device, fused=s.fused, num_params=s.num_params,
                param_bytes=s.param_bytes, state_ids=tuple(s.state_params),
                last_step_id=s.last_step, transport="grpc",
            )
            for s in reply.shards
        ]  # fmt: skip

    # ----- LBFGS: the gateway steps, the closure runs here --------------------------------------

    def _closure_step(self, closure: Callable[[], Any] | None) -> Any:
        """One step of ``ClosureStep``: evaluates the closure wherever the gateway's step asks
        (see :mod:`shardopt.gateway.closure_step`); returns its first value, as torch does."""
        if closure is None:
            raise TypeError("LBFGS.step() missing required argument: 'closure'")
        params = self._params.flat()
        if self.shard_map.any_changed(params):
            self.push_params()
        groups = wire.encode_groups(self._params.groups, with_ids=False)
        start = pb.StepRequest(session_id=self.session_id, param_groups=groups)
        # tried again only while the gateway has asked for nothing: it began no step then
        done, loss = self._retrying(lambda: self._closure_conversation(closure, params, start))
        self.shard_map.set_state_order(done.state_order)
        self.pull_params()  # the step's last update follows its last evaluation
        return loss

    def _closure_conversation(
        self, closure: Callable[[], Any], params: list[torch.Tensor], start: Any
    ) -> tuple[Any, Any]:
        """One ``ClosureStep`` call; returns its ``done`` reply and the closure's first value.
        Raises ``grpc.RpcError`` only
        while the gateway has asked for no evaluation (a failure then may be tried again);
        after, the exception the failure stands for, with a note that it is not retried."""
        outbox: queue.Queue[Any] = queue.Queue()
        outbox.put([pb.ClosureStepRequest(start=start)])

        def requests() -> Iterator[Any]:
            while (messages := outbox.get()) is not None:
                yield from messages

        call = self._stub.ClosureStep(requests(), metadata=self._metadata)
        first: list[Any] = []
        asked = False
        try:
            for answer in call:
                kind = answer.WhichOneof("kind")
                if kind == "done":
                    break
                asked = True
                if kind != "evaluate":
                    raise wire.WireError(f"expected an evaluate request, got a {kind}")
                if answer.evaluate.params:  # the step moved the parameters: evaluate there
                    staging = self._staging(params)
                    nbytes = sum(t.numel() * t.element_size() for t in staging)
                    receiver = wire.TensorReceiver(
                        list(answer.evaluate.params), nbytes, what="parameter", into=staging
                    )
                    for pid, (p, value) in enumerate(zip(params, receiver.receive(call))):
                        assign(p, value)
                        self.shard_map.record(pid, p)
                with torch.enable_grad():
                    loss = closure()
                first[:] = first or [loss]
                header, grads = gradients_of(params, dense=True)
                evaluation = pb.Evaluation(
                    loss=float(loss), params=header.params, grads=header.grads
                )
                outbox.put([pb.ClosureStepRequest(evaluation=evaluation)])
                outbox.put(chunk_codec.encoded_chunks(grads))
            else:
                raise errors.ShardoptError("the gateway ended the step without finishing it")
        except grpc.RpcError as err:
            if not asked:
                raise  # nothing of the step reached a shard: the caller may try it again
            exc = raised(err)
            if reconnectable(err):
                exc.add_note(
                    "shardopt: the gateway was lost during this LBFGS step, after it had asked "
                    "for an evaluation: the step is not tried again (the shards may hold part "
                    "of it; a gateway restarted with --session-store refuses the session's "
                    "further steps if so)"
                )
            raise exc from None
        finally:
            outbox.put(None)
            call.cancel()  # a no-op once the call is over; else (the closure raised) it ends it
        return answer.done, first[0]
