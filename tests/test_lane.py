"""Step lanes: the Unix socket that carries a step to a shard on the client's node.

The lane's two ends in-process (answers, the shard's own errors, the token checked before
anything is read, no socket file left behind), then real shards: their steps go through the
lanes, and a lane that breaks sends the step through Ray instead, applied once, torch's numbers
throughout.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import ray
import torch
from helpers import assert_same_params, make_model, run_steps
from reference import run_as_shards

import shardopt
from shardopt.client.lanes import first_answer
from shardopt.core.lane import TOKEN_BYTES, LaneBroken, LaneClient, LaneServer


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickle rebuilds exceptions from .args: one argument is missing
        super().__init__(a)


def _serve(request):
    if request == "bad value":
        raise ValueError("Invalid learning rate: -1")
    if request == "odd error":
        raise Unpicklable("odd", "error")
    return ("served", request)


def test_a_lane_answers_and_raises_the_shards_own_errors():
    server = LaneServer(_serve)
    client = LaneClient(server.address)
    try:
        client.send({"step": 3})
        assert client.receive() == ("served", {"step": 3})
        client.send("bad value")
        with pytest.raises(ValueError, match="Invalid learning rate: -1"):
            client.receive()
        client.send("odd error")
        with pytest.raises(RuntimeError, match="Unpicklable: odd"):
            client.receive()
        client.send(7)  # the lane goes on after errors
        assert client.receive() == ("served", 7)
    finally:
        client.close()
        server.close()


def test_waiting_for_the_first_answer_gives_up_at_its_timeout_and_keeps_what_it_waits_on():
    """(What a step stopped part-way does: first_answer with a timeout.) A lane whose shard
    takes longer than the wait is still pending afterwards; an answer in time is taken."""
    release = threading.Event()
    server = LaneServer(lambda request: release.wait(30) and ("served", request))
    client = LaneClient(server.address)
    try:
        client.send("slow")
        pending = {client: 0}
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no answer from shard\(s\) \[0\]"):
            first_answer(pending, timeout_s=0.2)
        assert 0.15 < time.monotonic() - started < 5
        assert pending == {client: 0}
        release.set()
        assert first_answer(pending, timeout_s=10) == (client, 0) and not pending
        assert client.receive() == ("served", "slow")
    finally:
        client.close()
        server.close()


def test_both_lanes_carry_requests_plain_pickle_cannot_take():
    """A step request carries the param groups' options, and torch lets a group hold a lambda:
    the client's lanes pickle such a request as Ray does (cloudpickle) instead of failing."""
    import numpy as np

    from shardopt.client.lanes import dump_request
    from shardopt.core.net_lane import NetLaneClient, NetLaneServer

    offset = 3
    request = {"options": ({"lr": 0.1, "clip": lambda g: g + offset},)}
    server = LaneServer(lambda r: r["options"][0]["clip"](4))
    client = LaneClient(server.address, dump_request)
    net_server = NetLaneServer(
        "127.0.0.1", 4, lambda r, payload: (r["options"][0]["clip"](1), None)
    )
    net_client = NetLaneClient(net_server.address, dump_request)
    try:
        client.send(request)
        assert client.receive() == 7
        net_client.send(request, np.zeros(4, dtype=np.uint8))
        assert net_client.receive() == 4
    finally:
        for end in (client, server, net_client, net_server):
            end.close()


def test_a_lane_leaves_no_socket_behind_once_its_client_is_in():
    server = LaneServer(_serve)
    path = server.address.path
    assert os.path.exists(path) and os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    client = LaneClient(server.address)
    client.send(1)
    assert client.receive() == ("served", 1)
    assert not os.path.exists(os.path.dirname(path))
    with pytest.raises(LaneBroken):  # one client per lane
        LaneClient(server.address)
    client.close()
    server.close()


def test_a_lane_refuses_a_client_without_its_token_and_reads_nothing_more():
    calls = []
    server = LaneServer(lambda request: calls.append(request))
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    intruder.connect(server.address.path)
    intruder.sendall(b"x" * TOKEN_BYTES + b"\0" * 8)
    intruder.settimeout(30)
    try:  # the lane closed without reading the frame (unread bytes may reset the socket)
        assert intruder.recv(1) == b""
    except ConnectionResetError:
        pass
    intruder.close()
    assert calls == []


def test_a_lane_closed_by_the_shard_breaks_on_the_client():
    server = LaneServer(_serve)
    client = LaneClient(server.address)
    client.send(1)
    assert client.receive() == ("served", 1)
    server.close()
    with pytest.raises(LaneBroken):
        client.send(2)
        client.receive()
    assert client.closed


# ----- real shards ----------------------------------------------------------------------------


def _record_threads(host, key):
    """Runs in a shard host: remembers which thread ran each of the shard's steps."""
    shard = host._shards[key]
    step = shard.step
    host.step_threads = []

    def recording_step(request):
        host.step_threads.append(threading.current_thread().name)
        return step(request)

    shard.step = recording_step


def _close_lane(host, key):
    host._lanes[key].close()


def test_steps_go_through_lanes_and_through_ray_once_a_lane_breaks():
    sharded, reference = make_model(), make_model()
    opt = shardopt.AdamW(sharded.parameters(), lr=1e-2, weight_decay=0.1, num_shards=2)
    ref = run_as_shards(torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1))
    try:
        handles = opt._backend.handles
        assert opt.uses_shared_memory == [True, True]
        ray.get([h.host.__ray_call__.remote(_record_threads, h.key) for h in handles])
        run_steps(sharded, opt, 2)
        run_steps(reference, ref, 2)
        assert_same_params(sharded, reference)
        ray.get(handles[0].host.__ray_call__.remote(_close_lane, handles[0].key))
        run_steps(sharded, opt, 2)
        run_steps(reference, ref, 2)
        assert_same_params(sharded, reference)
        threads = ray.get([h.host.__ray_call__.remote(lambda h: h.step_threads) for h in handles])
        assert all(t.startswith("shardopt-lane-") for t in threads[1])
        assert all(t.startswith("shardopt-lane-") for t in threads[0][:2])
        assert not any(t.startswith("shardopt-lane-") for t in threads[0][2:])  # through Ray
        # the broken lane's step went through Ray once: applied once, as torch applied it
        assert [s.last_step_id for s in opt.shard_status()] == [3, 3]
        backend = opt._backend
        assert backend.lanes.get(0, backend.handles[0]) is None
        assert backend.lanes.get(1, backend.handles[1]) is not None
    finally:
        opt.close()


@pytest.mark.parametrize(
    "options",
    [{"shared_memory": False}, {"replicate": True}],
    ids=["object_store", "replicas"],  # replicas: a refresh's export must not be overtaken
)
def test_steps_go_through_ray_without_shared_memory_or_with_replicas(options):
    sharded, reference = make_model(), make_model()
    opt = shardopt.SGD(sharded.parameters(), lr=1e-2, momentum=0.9, num_shards=2, **options)
    ref = run_as_shards(torch.optim.SGD(reference.parameters(), lr=1e-2, momentum=0.9))
    try:
        assert len(opt._backend.lanes) == 0
        run_steps(sharded, opt, 2)
        run_steps(reference, ref, 2)
        assert_same_params(sharded, reference)
    finally:
        opt.close()
