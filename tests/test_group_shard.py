"""GroupShardHost as a plain class in this process: sync rounds, timeouts, async staleness, the
gradient slots of ranks on its node.

(Its parameters come back through the object store, so the session's Ray is used for that.)
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import ray
import torch

from shardopt.actor.shard_group_host import GroupShardHost
from shardopt.core import shm
from shardopt.core.buffers import FlatLayout, readonly_tensor, to_numpy
from shardopt.core.errors import GroupTimeoutError
from shardopt.core.lane import LaneBroken, LaneClient
from shardopt.core.net_lane import NetLaneClient
from shardopt.core.read_gate import ReadGate
from shardopt.core.records import GroupConfig, ParamBlock, ParamUpdate, PushRequest, ShardSpec

OPTIONS = {"lr": 0.5, "momentum": 0.0, "dampening": 0, "weight_decay": 0, "nesterov": False,
           "maximize": False, "foreach": None, "differentiable": False, "fused": None}  # fmt: skip


def make_host(mode="sync", world_size=2, max_staleness=None, timeout_s=30.0):
    config = GroupConfig(world_size, mode, max_staleness, timeout_s, 1, None, (), ())
    host = GroupShardHost("unit", config)
    tensors = [torch.zeros(3)]
    layout = FlatLayout.for_tensors(tensors)
    block = ParamBlock((0,), (0,), layout, to_numpy(layout.pack(tensors)))
    host.create("unit/0", 0, ShardSpec(torch.optim.SGD, {"lr": 0.5}, (OPTIONS,), block), None)
    return host, layout


def request(rank, version, grad, layout, **options):
    flat = layout.pack([torch.full((3,), float(grad))])
    return PushRequest(rank, version, ({**OPTIONS, **options},), to_numpy(flat), (True,), {})


def params_of(result, layout):
    return layout.view(readonly_tensor(ray.get(result.current.params)), 0).clone()


def both(host, layout, version, **options):
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(host.push, "unit/0", request(r, version, r + 1, layout, **options))
            for r in range(2)
        ]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def test_sync_round_averages_in_rank_order_and_all_ranks_get_the_same_answer():
    host, layout = make_host()
    first, second = both(host, layout, 0)
    assert first.applied_version == second.applied_version == 0
    assert first.current is second.current or first.current == second.current
    # mean gradient (1 + 2) / 2 = 1.5, lr 0.5
    assert torch.equal(params_of(first, layout), torch.full((3,), -0.75))
    assert host.version() == 1


def test_a_failed_round_fails_every_rank_and_a_retry_succeeds_for_all():
    host, layout = make_host()
    outcomes = both(host, layout, 0, lr="not a number")  # torch raises inside the step
    assert all(isinstance(o, TypeError) for o in outcomes)
    assert host.version() == 0
    retry = both(host, layout, 0)
    assert [r.applied_version for r in retry] == [0, 0]
    assert host.version() == 1


def test_a_missing_rank_times_out_and_the_push_is_withdrawn():
    host, layout = make_host(timeout_s=0.3)
    with pytest.raises(GroupTimeoutError, match=r"rank\(s\) \[1\]"):
        host.push("unit/0", request(0, 0, 1, layout))
    assert host.version() == 0 and host._round == {}
    assert [r.applied_version for r in both(host, layout, 0)] == [0, 0]


def test_sync_refuses_pushes_for_other_versions_and_duplicates():
    host, layout = make_host(timeout_s=0.3)
    with pytest.raises(ValueError, match="only at version 0"):
        host.push("unit/0", request(0, 5, 1, layout))
    both(host, layout, 0)
    with pytest.raises(ValueError, match="pull_params"):
        host.push("unit/0", request(0, 0, 1, layout))


def test_async_staleness_bound():
    host, layout = make_host(mode="async", max_staleness=1)
    answers = [host.push("unit/0", request(0, 0, 1, layout)) for _ in range(3)]
    assert [a.applied_version for a in answers] == [0, 1, None]
    assert [a.staleness for a in answers] == [0, 1, None]
    assert answers[2].current.version == 2  # the refused worker gets the current parameters
    assert torch.equal(params_of(answers[2], layout), torch.full((3,), -1.0))


def test_a_vote_to_skip_skips_the_round_for_every_rank_and_async_refuses_it():
    """A rank whose GradScaler found an inf votes to skip (no gradients): the round updates
    nothing, every rank is answered (skipped) at its version + 1, a resend of the vote is
    answered from that round, the next round applies as usual; an async host refuses votes."""
    host, layout = make_host()
    vote = replace(request(1, 0, 0, layout), grads=None, has_grad=(False,), skip=True)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: host.push("unit/0", p), [request(0, 0, 1, layout), vote]))
    assert [(a.applied_version, a.skipped) for a in answers] == [(0, True), (0, True)]
    assert host.version() == 1 and torch.equal(host._shard.params[0], torch.zeros(3))
    assert torch.equal(params_of(answers[0], layout), torch.zeros(3))
    assert host.push("unit/0", replace(vote, resend=True)).skipped  # answered once, from its round
    first, second = both(host, layout, 1)
    assert not first.skipped and torch.equal(params_of(first, layout), torch.full((3,), -0.75))
    async_host, layout = make_host(mode="async")
    with pytest.raises(ValueError, match="sync mode"):
        async_host.push("unit/0", replace(vote, rank=0))
    assert async_host.version() == 0


# ----- shared memory: gradient slots for the ranks on the shard's node ---------------------------


def test_slot_pushes_average_in_rank_order_with_the_same_bits_as_sent_ones():
    """Ranks 0 and 2 have slots, rank 1 sends its gradients; the sum is taken in rank order as
    the pushes arrive (values chosen so that order matters), and starts over when a round's
    pushes are withdrawn after part of it was summed."""
    host, layout = make_host(world_size=3, timeout_s=2.0)
    node = ray.get_runtime_context().get_node_id()
    buffers = {r: host.attach_shared("unit/0", r, node) for r in (0, 2)}
    assert host.attach_shared("unit/0", 1, "another-node") is None
    grads = {0: 1e8, 1: 1.0, 2: -1e8}
    for r, b in buffers.items():
        slot = shm.attach(b.grad_path, b.nbytes)  # unlinks the file: nothing left behind
        assert not os.path.exists(b.grad_path)
        layout.pack([torch.full((3,), grads[r])], out=slot)
    sent = request(1, 0, grads[1], layout)
    pushes = [replace(request(r, 0, 0, layout), grads=None) if r != 1 else sent for r in range(3)]
    with ThreadPoolExecutor(3) as pool:
        partial = [pool.submit(host.push, "unit/0", p) for p in pushes[:2]]  # rank 2 missing
        for f in partial:
            with pytest.raises(GroupTimeoutError):
                f.result()
        assert host.version() == 0
        answers = list(pool.map(lambda p: host.push("unit/0", p), pushes))
    mean = ((torch.tensor(1e8) + torch.tensor(1.0)) + torch.tensor(-1e8)) / 3
    assert torch.equal(host._shard.params[0], torch.full((3,), -0.5 * mean.item()))
    assert answers[0].current.params is None and answers[2].current.params is None
    assert torch.equal(params_of(answers[1], layout), host._shard.params[0])  # by the store
    shared = shm.attach(buffers[0].param_path, buffers[0].nbytes)  # the shard's own buffer
    assert torch.equal(layout.view(shared, 0), host._shard.params[0])
    host.close()


def test_a_push_without_gradients_needs_a_slot():
    host, layout = make_host(world_size=1)
    with pytest.raises(ValueError, match="no gradient slot"):
        host.push("unit/0", replace(request(0, 0, 1, layout), grads=None))
    assert host.version() == 0


def test_async_ranks_copy_the_shards_buffer_under_its_read_gate_at_the_version_it_says():
    """An async rank on the shard's node copies the shard's own parameter buffer under the read
    gate (another rank's push changes what it reads, and the gate says which version that is).
    While a rank holds the gate, a push waits for it; held past the group's timeout, the push
    fails with GroupTimeoutError naming the cause and changes nothing. A state load waits too."""
    host, layout = make_host(mode="async", timeout_s=0.5)
    b = host.attach_shared("unit/0", 1, ray.get_runtime_context().get_node_id())
    reads = shm.attach(b.param_path, b.nbytes)
    gate = ReadGate.open(b.gate_path)  # unlinks its name: nothing left behind
    assert not os.path.exists(b.gate_path)
    layout.pack([torch.full((3,), 2.0)], out=shm.attach(b.grad_path, b.nbytes))
    answer = host.push("unit/0", replace(request(1, 0, 0, layout), grads=None))
    assert answer.applied_version == 0 and answer.current.params is None
    with gate.reading() as version:
        assert version == 1 and torch.equal(layout.view(reads, 0), torch.full((3,), -1.0))
    other = host.push("unit/0", request(0, 1, 1, layout))  # rank 0: through the object store
    assert torch.equal(params_of(other, layout), torch.full((3,), -1.5))
    with gate.reading() as version:  # the shard's own buffer: rank 0's push is in it
        assert version == 2 and torch.equal(layout.view(reads, 0), torch.full((3,), -1.5))
        with pytest.raises(GroupTimeoutError, match="held it for more than 0.5 s"):
            host.push("unit/0", request(0, 2, 1, layout))
        with pytest.raises(GroupTimeoutError, match="held it for more than"):
            host.set_params("unit/0", ParamUpdate((0,), layout, to_numpy(torch.ones(3))))
        assert host.version() == 2 and torch.equal(host._shard.params[0], torch.full((3,), -1.5))
        assert torch.equal(layout.view(reads, 0), torch.full((3,), -1.5))
    with ThreadPoolExecutor(1) as pool:
        with gate.reading():
            waiting = pool.submit(host.push, "unit/0", request(0, 2, 1, layout))
            time.sleep(0.1)
            assert not waiting.done()  # a push waits for the copy in progress
        assert waiting.result().applied_version == 2
    with gate.reading() as version:
        assert version == 3 and torch.equal(layout.view(reads, 0), torch.full((3,), -2.0))
    assert host.pull("unit/0", 1).params is None
    gate.close()
    host.close()


def test_async_rank_sharing_its_parameters_reads_a_buffer_of_its_own():
    """With ``own_copy`` (a worker with share_params: its parameters are the buffer it reads)
    an async rank gets a buffer of its own that the shard fills only when it answers it:
    another rank's push changes the shard, not what this rank's model holds."""
    host, layout = make_host(mode="async")
    b = host.attach_shared("unit/0", 1, ray.get_runtime_context().get_node_id(), own_copy=True)
    assert b.gate_path is None
    reads = shm.attach(b.param_path, b.nbytes)
    layout.pack([torch.full((3,), 2.0)], out=shm.attach(b.grad_path, b.nbytes))
    answer = host.push("unit/0", replace(request(1, 0, 0, layout), grads=None))
    assert answer.applied_version == 0 and answer.current.params is None
    assert torch.equal(layout.view(reads, 0), torch.full((3,), -1.0))
    other = host.push("unit/0", request(0, 1, 1, layout))  # rank 0: through the object store
    assert torch.equal(params_of(other, layout), torch.full((3,), -1.5))
    assert torch.equal(layout.view(reads, 0), torch.full((3,), -1.0))  # not rank 1's answer
    assert host.pull("unit/0", 1).params is None
    assert torch.equal(layout.view(reads, 0), torch.full((3,), -1.5))
    host.close()


def test_a_push_lane_carries_its_own_ranks_pushes_only():
    """A lane opened for rank 0 refuses a push in another rank's name and changes nothing."""
    host, layout = make_host(world_size=1)
    host.attach_shared("unit/0", 0, ray.get_runtime_context().get_node_id())
    client = LaneClient(host.open_lane("unit/0", 0))
    client.send(request(1, 0, 1, layout))
    with pytest.raises(ValueError, match="rank 0 carries that rank's pushes only"):
        client.receive()
    assert host.version() == 0
    client.close()
    host.close()


def test_a_network_lane_carries_gradients_in_and_parameters_back_and_refuses_intruders():
    """A rank on another node pushes over TCP: the gradients go in the push, the parameters come
    back inline (nothing in the object store). A wrong token is closed before anything is read;
    a push in another rank's name is refused; neither changes the shard. A lane the host closes
    breaks on the client's next call."""
    import socket

    host, layout = make_host(mode="async")
    address = host.open_net_lane("unit/0", 1)
    assert address.nbytes == layout.nbytes
    intruder = socket.create_connection((address.host, address.port))
    intruder.sendall(bytes(32) + b"SOL1" + bytes(16) + b"\x80" * 64)  # wrong token, then junk
    intruder.settimeout(10)
    assert intruder.recv(1) == b""  # closed without an answer
    intruder.close()
    assert host.version() == 0
    with pytest.raises(LaneBroken):  # the lane accepted its one connection: it is gone
        NetLaneClient(address).send(request(1, 0, 2, layout), layout.pack([torch.ones(3)]))
    client = NetLaneClient(host.open_net_lane("unit/0", 1))
    grads = layout.pack([torch.full((3,), 2.0)])
    client.send(replace(request(0, 0, 0, layout), grads=None), grads)
    with pytest.raises(ValueError, match="rank 1 carries that rank's pushes only"):
        client.receive()
    assert host.version() == 0 and torch.equal(host._shard.params[0], torch.zeros(3))
    client.send(replace(request(1, 0, 0, layout), grads=None), grads)
    answer = client.receive()
    assert answer.applied_version == 0 and answer.current.params is None
    assert torch.equal(layout.view(readonly_tensor(client.params), 0), torch.full((3,), -1.0))
    other = host.push("unit/0", request(0, 1, 1, layout))  # rank 0 through the object store
    assert torch.equal(params_of(other, layout), torch.full((3,), -1.5))
    client.send(replace(request(1, 0, 0, layout), grads=None), layout.pack([torch.zeros(3)]))
    client.receive()  # async: answered from the rank's own copy, taken under the lock
    assert torch.equal(layout.view(readonly_tensor(client.params), 0), torch.full((3,), -1.5))
    assert host.version() == 3
    host._lanes[1].close()
    with pytest.raises(LaneBroken):
        client.send(replace(request(1, 3, 0, layout), grads=None), grads)
        client.receive()
    assert host.version() == 3
    host.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_worker_steps_on_its_slot_without_a_copy(mode):
    """A group of one: the worker's slot is the shard's gradient buffer and it reads the shard's
    own parameter buffer (nobody else pushes), in either mode."""
    host, layout = make_host(mode=mode, world_size=1)
    b = host.attach_shared("unit/0", 0, ray.get_runtime_context().get_node_id())
    slot, reads = shm.attach(b.grad_path, b.nbytes), shm.attach(b.param_path, b.nbytes)
    layout.pack([torch.full((3,), 4.0)], out=slot)
    assert torch.equal(layout.view(host._shard.grad_buffer(), 0), torch.full((3,), 4.0))
    answer = host.push("unit/0", replace(request(0, 0, 0, layout), grads=None))
    assert answer.applied_version == 0 and answer.current.params is None
    assert torch.equal(host._shard.params[0], torch.full((3,), -2.0))
    host._shard.params[0].add_(1.0)  # the worker reads the shard's own buffer, not a copy
    assert torch.equal(layout.view(reads, 0), torch.full((3,), -1.0))
    host.close()


def test_async_steps_on_each_ranks_slot_where_it_is():
    """Async with more ranks: each push is stepped on its rank's slot in place (the shard's
    gradient buffer is not written), on what the slot holds at that push; a rank that attaches
    again gets a new slot and its next push reads that one."""
    host, layout = make_host(mode="async")
    node = ray.get_runtime_context().get_node_id()
    slots = {}
    for r in range(2):
        b = host.attach_shared("unit/0", r, node)
        slots[r] = shm.attach(b.grad_path, b.nbytes)
    host._shard.grad_buffer().fill_(0)
    expected = torch.zeros(3)
    for version, (rank, grad) in enumerate([(0, 2.0), (1, 3.0), (0, -1.0), (1, 0.5)]):
        layout.pack([torch.full((3,), grad)], out=slots[rank])
        answer = host.push("unit/0", replace(request(rank, version, 0, layout), grads=None))
        expected -= 0.5 * grad
        assert answer.applied_version == version
        assert torch.equal(host._shard.params[0], expected)
    assert not host._shard.grad_buffer().any()
    b = host.attach_shared("unit/0", 1, node)  # attached again: a new slot
    layout.pack([torch.full((3,), 8.0)], out=shm.attach(b.grad_path, b.nbytes))
    layout.pack([torch.full((3,), 100.0)], out=slots[1])  # the old slot is not read any more
    host.push("unit/0", replace(request(1, 4, 0, layout), grads=None))
    assert torch.equal(host._shard.params[0], expected - 4.0)
    host.close()


def _until(condition, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_resent_push_is_answered_once_whether_its_round_waited_or_was_applied():
    """A push sent again (``resend``: a restarted gateway repeating a step whose answer was
    lost) while the first waits in its round takes that push's place: the round averages the
    rank once and both calls get its answer. Sent again after its round was applied, it is
    answered from that round (neither applied again nor refused as a second push); without
    ``resend`` it is still refused. A first push that times out withdraws nothing of a resend
    that took its place."""
    host, layout = make_host(timeout_s=1.0)
    resent = lambda rank, version, grad: replace(  # noqa: E731
        request(rank, version, grad, layout), resend=True
    )
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(host.push, "unit/0", request(0, 0, 1, layout))
        _until(lambda: 0 in host._round)
        again = pool.submit(host.push, "unit/0", resent(0, 0, 1))
        _until(lambda: host._round.get(0) is not None and host._round[0].resend)
        other = host.push("unit/0", request(1, 0, 2, layout))
        answers = [first.result(), again.result(), other]
    assert [a.applied_version for a in answers] == [0, 0, 0] and host.version() == 1
    assert torch.equal(params_of(other, layout), torch.full((3,), -0.75))  # (1 + 2) / 2 once
    repeat = host.push("unit/0", resent(0, 0, 1))  # the round was applied, its answer lost
    assert (repeat.applied_version, repeat.participants) == (0, other.participants)
    assert host.version() == 1 and torch.equal(params_of(repeat, layout), torch.full((3,), -0.75))
    with pytest.raises(ValueError, match="pull_params"):
        host.push("unit/0", request(0, 0, 1, layout))
    with ThreadPoolExecutor(2) as pool:  # version 1: the first push times out after the resend
        first = pool.submit(host.push, "unit/0", request(0, 1, 1, layout))
        _until(lambda: 0 in host._round)
        time.sleep(0.5)
        again = pool.submit(host.push, "unit/0", resent(0, 1, 1))
        with pytest.raises(GroupTimeoutError):
            first.result()
        assert host._round[0].resend  # still in the round
        other = host.push("unit/0", request(1, 1, 2, layout))
        assert again.result().applied_version == other.applied_version == 1
    assert host.version() == 2
    host.close()
