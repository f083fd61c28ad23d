"""Raw gRPC calls to a gateway, as a client (or an attacker) makes them, for the gateway tests.

The helpers build the protocol's messages by hand (no RemoteClient), so tests can send what a
well-behaved client never would. :func:`guarded_victim` is the check every attack ends with: a
victim session with optimizer state and a bystander session of another token, both unchanged
and still stepping afterwards.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch
from helpers import assert_same_state_dict, assert_same_tensors

from shardopt.core import wire
from shardopt.core.proto import pb, tensors_pb
from shardopt.gateway.quotas import Limits

TOKEN = "token-of-client-a-0123456789"
OTHER_TOKEN = "token-of-client-b-9876543210"
WARM_POOL = Limits(idle_shard_hosts=4)
"""A gateway's default limits, but keeping four idle shard hosts (not a session's default
one): the tests around it make two-shard optimizers in this process too, which would each
start new host actors (seconds each) while the gateway trims the shared pool to one."""


def auth(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def open_session(stub, params, token=TOKEN, optimizer="SGD", hyperparameters=None, **spec):
    spec = pb.SessionSpec(
        optimizer=optimizer,
        hyperparameters=wire.encode_options(hyperparameters or {"lr": 0.1}),
        params=[wire.spec_of(p) for p in params],
        **spec,
    )

    def requests():
        yield pb.OpenSessionRequest(spec=spec)
        for chunk in wire.tensor_chunks(params):
            yield pb.OpenSessionRequest(chunk=chunk)

    return stub.OpenSession(requests(), metadata=auth(token))


def close_session(stub, session_id, token=TOKEN):
    return stub.CloseSession(pb.SessionRef(session_id=session_id), metadata=auth(token))


def push(stub, session_id, grads, indices=None, specs=None, chunks=None, token=TOKEN):
    indices = list(range(len(grads))) if indices is None else indices
    header = pb.PushGradientsHeader(
        session_id=session_id, params=indices,
        grads=specs if specs is not None else [wire.spec_of(g) for g in grads],
    )  # fmt: skip

    def requests():
        yield pb.PushGradientsRequest(header=header)
        for chunk in chunks if chunks is not None else wire.tensor_chunks(grads):
            yield pb.PushGradientsRequest(chunk=chunk)

    return stub.PushGradients(requests(), metadata=auth(token))


def step(stub, session_id, token=TOKEN, param_groups=()):
    request = pb.StepRequest(session_id=session_id, param_groups=list(param_groups))
    return stub.Step(request, metadata=auth(token))


def received(answers, specs) -> list[torch.Tensor]:
    """The tensors of ``specs`` from the chunks of a stream's answers after its header."""
    receiver = wire.TensorReceiver(list(specs), 1 << 30)
    for answer in answers[1:]:
        receiver.add(answer.chunk)
    return receiver.finish()


def pull(stub, session_id, token=TOKEN):
    answers = list(
        stub.PullParameters(pb.PullParametersRequest(session_id=session_id), metadata=auth(token))
    )
    return received(answers, answers[0].header.params)


def state_of(stub, session_id, token=TOKEN):
    answers = list(
        stub.GetStateDict(pb.GetStateDictRequest(session_id=session_id), metadata=auth(token))
    )
    header = answers[0].header
    return wire.decode_value(header.state_dict, received(answers, header.tensors))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def chunk(index, offset, data):
    return tensors_pb.TensorChunk(index=index, offset=offset, data=data)


class Victim:
    """A victim session (with Adam state) and a bystander session of another token."""

    def __init__(self, stub, token: str, bystander_token: str) -> None:
        self.stub, self.token, self.bystander_token = stub, token, bystander_token
        params = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
        self.session_id = open_session(stub, params, token, optimizer="Adam").session_id
        push(stub, self.session_id, [torch.ones(2, 3), torch.ones(4)], token=token)
        step(stub, self.session_id, token)
        self.bystander = open_session(stub, [torch.zeros(3)], bystander_token).session_id
        self.before = self.snapshot()

    def snapshot(self):
        return pull(self.stub, self.session_id, self.token), state_of(
            self.stub, self.session_id, self.token
        )

    def bystander_steps(self) -> None:
        """The bystander pushes and steps (raises if the gateway does not serve it)."""
        push(self.stub, self.bystander, [torch.ones(3)], token=self.bystander_token)
        step(self.stub, self.bystander, self.bystander_token)

    def check_unchanged(self) -> None:
        params, state = self.snapshot()
        assert_same_tensors(params, self.before[0])
        assert_same_state_dict(state, self.before[1])

    def close(self) -> None:
        close_session(self.stub, self.session_id, self.token)
        close_session(self.stub, self.bystander, self.bystander_token)


@contextmanager
def guarded_victim(stub, token=TOKEN, bystander_token=OTHER_TOKEN) -> Iterator[Victim]:
    """A :class:`Victim`; after the block, its session is unchanged and the bystander steps."""
    victim = Victim(stub, token, bystander_token)
    try:
        yield victim
        victim.check_unchanged()
        victim.bystander_steps()
    finally:
        victim.close()


def drain(process: subprocess.Popen) -> subprocess.Popen:
    """Reads a server's further output on a thread (into ``process.output``), so that its pipe
    never fills and blocks it (call after the last :func:`wait_for_line`); see :func:`stopped`."""
    process.output = []

    def read() -> None:
        for line in process.stdout:
            process.output.append(line)

    process.drainer = threading.Thread(target=read, name="server-output", daemon=True)
    process.drainer.start()
    return process


def stopped(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """A drained server's exit code, once it exits, and its output since :func:`drain`.

    Raises:
        AssertionError: it did not exit within ``timeout`` (with the end of its output).
    """
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tail = "".join(process.output)[-8000:]
        raise AssertionError(f"the server did not exit in {timeout} s; it said:\n{tail}") from None
    process.drainer.join(10)
    return code, "".join(process.output)


def wait_for_line(process: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no {prefix!r} line from the server (exit code {process.poll()})")
