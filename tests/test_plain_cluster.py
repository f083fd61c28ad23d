"""A plain optimizer whose shards are on another node: its steps go over network lanes.

Uses conftest's ``cluster`` (three raylets on this machine; these tests run first). The client is
this process, on the head; the shards are pinned to another node, so no shared memory: each
step's gradients go over a TCP lane straight into the shard's gradient buffer and the
parameters come back inline in the answer, where they used to go through Ray's object store.
"""

from __future__ import annotations

import hmac
import socket

import pytest
import ray
import torch
from helpers import make_model
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import shardopt
from shardopt.actor.threads import usable_cpus
from shardopt.client import lanes as lanes_module

pytestmark = pytest.mark.cluster

HYPER = {"lr": 0.01, "weight_decay": 0.01}


def other_node() -> str:
    head = ray.get_runtime_context().get_node_id()
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)[0]


def pinned(node: str) -> dict:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


class RayStepCounter:
    """Counts the steps a shard handle sends through Ray (the real call still runs)."""

    def __init__(self, handles: list) -> None:
        self.calls = [0] * len(handles)
        for s, handle in enumerate(handles):
            object.__setattr__(handle, "step", self._counting(s, handle.step))  # a frozen record

    def _counting(self, shard, step):
        def counted(request):
            self.calls[shard] += 1
            return step(request)

        return counted


def stepper(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def step(freeze_last: bool = False) -> None:
        opt.zero_grad()
        model(torch.randn(5, model[0].in_features, generator=gen)).square().mean().backward()
        if freeze_last:  # a parameter without a gradient: its slot is skipped, as torch skips it
            list(model.parameters())[-1].grad = None
        opt.step()

    return step


def close_lane(host, key: str) -> None:
    ray.get(host.__ray_call__.remote(lambda self, k: self._close_lane(k), key))


@pytest.mark.parametrize("overlap", [False, True], ids=["packed", "overlap"])
def test_shards_on_another_node_step_over_network_lanes_bit_identical_to_torch(cluster, overlap):
    """Steps over network lanes (a GradScaler's step too) equal ``torch.optim.AdamW(fused=True)``
    bit for bit, send nothing through Ray, survive ``add_param_group`` (new lanes) and fall
    back to Ray, with the same bits, for parameters written in place, a lane the host closed,
    and a lane taken over by a client with the wrong token. With ``overlap=True`` the gradients
    are packed during backward and go over the same lanes."""
    node = other_node()
    model, reference = make_model(), make_model()
    opt = shardopt.AdamW(
        model.parameters(), num_shards=2, actor_options=pinned(node), overlap=overlap, **HYPER
    )
    torch_opt = torch.optim.AdamW(reference.parameters(), fused=True, **HYPER)
    backend = opt.backend
    assert set(backend.host_nodes) == {node}
    assert backend.uses_shared_memory == [False, False]
    assert backend.lanes.net == 2
    assert [st.transport for st in opt.shard_status()] == ["network_lane"] * 2
    through_ray = RayStepCounter(backend.handles)
    ours, theirs = stepper(model, opt, 1), stepper(reference, torch_opt, 1)

    def check(**kwargs) -> None:
        ours(**kwargs)
        theirs(**kwargs)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q)

    for k in range(3):
        check(freeze_last=k == 1)
    assert through_ray.calls == [0, 0]
    gen = torch.Generator().manual_seed(2)  # under a GradScaler: its scale goes with the step
    x = torch.randn(5, model[0].in_features, generator=gen)
    for m, o in ((model, opt), (reference, torch_opt)):
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        o.zero_grad()
        scaler.scale(m(x).square().mean()).backward()
        scaler.step(o)
        scaler.update()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert through_ray.calls == [0, 0]

    with torch.no_grad():  # written in place: sent with the next step, through Ray
        for m in (model, reference):
            m[0].weight.mul_(0.5)
    check()
    assert sum(through_ray.calls) == 1  # the shard holding that weight; the other's lane
    calls = list(through_ray.calls)
    check()
    assert through_ray.calls == calls  # back on the lanes

    extra = torch.nn.Parameter(torch.randn(4, 3))
    extra_ref = torch.nn.Parameter(extra.detach().clone())
    opt.add_param_group({"params": [extra], "lr": 0.05})
    torch_opt.add_param_group({"params": [extra_ref], "lr": 0.05})
    assert backend.lanes.net == 2  # the hosts closed the old lanes; the client opened new ones
    for _ in range(2):
        extra.grad, extra_ref.grad = torch.ones(4, 3), torch.ones(4, 3)
        opt.step()
        torch_opt.step()
        assert torch.equal(extra, extra_ref)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q)
    assert through_ray.calls == calls

    handle = backend.handles[0]
    close_lane(handle.host, handle.key)  # the next step finds it broken: through Ray
    check()
    check()
    assert backend.lanes.net == 1
    assert through_ray.calls[0] >= calls[0] + 2 and through_ray.calls[1] == calls[1]
    assert [st.transport for st in opt.shard_status()] == ["object_store", "network_lane"]

    handle = backend.handles[1]  # its buffers move under the lane (as a restarted gateway's
    ray.get(handle.host.reattach.remote(handle.key, False))  # reattach moves them): the step
    calls = list(through_ray.calls)  # is answered "broken" unapplied and goes through Ray
    check()
    assert through_ray.calls == [calls[0] + 1, calls[1] + 1]
    assert backend.lanes.net == 0
    address = ray.get(handle.open_net_lane())  # a new lane to it, and its old client end
    backend.lanes.open(1, handle, address)  # swapped for one to the new lane
    calls = list(through_ray.calls)
    check()
    assert through_ray.calls == [calls[0] + 1, calls[1]]

    address = ray.get(handle.open_net_lane())  # a new lane replaces the client's; an intruder
    # connects to it with a wrong token
    assert address is not None and address.nbytes > 0
    intruder = socket.create_connection((address.host, address.port), timeout=10)
    wrong = bytes(len(address.token))
    assert not hmac.compare_digest(wrong, address.token)
    intruder.sendall(wrong + b"junk" * 64)
    intruder.settimeout(10)
    assert intruder.recv(1) == b""  # closed without an answer
    intruder.close()
    check()
    check()
    assert backend.lanes.net == 0
    assert opt.state_dict()["state"].keys() == torch_opt.state_dict()["state"].keys()
    opt.close()


def test_network_lanes_are_off_with_the_environment_switch_or_shared_memory_off(
    cluster, monkeypatch
):
    node = other_node()
    monkeypatch.setenv(lanes_module.NET_LANES_ENV, "0")
    opt = shardopt.AdamW(make_model().parameters(), num_shards=1, actor_options=pinned(node))
    assert opt.backend.lanes.net == 0
    assert [st.transport for st in opt.shard_status()] == ["object_store"]
    opt.close()
    monkeypatch.delenv(lanes_module.NET_LANES_ENV)
    opt = shardopt.AdamW(
        make_model().parameters(), num_shards=1, actor_options=pinned(node), shared_memory=False
    )
    assert opt.backend.lanes.net == 0
    opt.close()


def test_shards_spread_over_nodes_use_shared_memory_here_and_network_lanes_elsewhere(cluster):
    """Shards spread over the nodes: each one on this node in shared memory (a Unix step
    lane), each one elsewhere over a network lane, in one step; torch's numbers."""
    head = ray.get_runtime_context().get_node_id()
    model, reference = make_model(), make_model()
    opt = shardopt.AdamW(
        model.parameters(), num_shards=3, actor_options={"scheduling_strategy": "SPREAD"}, **HYPER
    )
    torch_opt = torch.optim.AdamW(reference.parameters(), fused=True, **HYPER)
    backend = opt.backend
    expected = ["shared_memory" if n == head else "network_lane" for n in backend.host_nodes]
    assert [st.transport for st in opt.shard_status()] == expected
    assert len(backend.lanes) == 3
    # three raylets of 4 CPUs on one machine: the shards split the machine's CPUs, not 4 each
    want = max(1, min(4, usable_cpus() // 3))
    threads = [
        h.host.__ray_call__.remote(lambda self: torch.get_num_threads()) for h in backend.handles
    ]
    assert ray.get(threads) == [want] * 3
    through_ray = RayStepCounter(backend.handles)
    ours, theirs = stepper(model, opt, 3), stepper(reference, torch_opt, 3)
    for _ in range(3):
        ours()
        theirs()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q)
    assert through_ray.calls == [0, 0, 0]
    opt.close()
