"""The per-shard transport (shardopt.client.transport) as far as a machine without a GPU can
check it: the choice for each shard, the refusals, ``shard_status()``'s ``transport`` field,
the shard's side of a direct step (a gradient tensor in, the parameters as a tensor out) bit for
bit against torch, the whole Ray Direct Transport path of a step through a real one-sided
transport for CPU tensors registered with Ray (tests/shm_transport.py), and torch's placement of
state for parameters off the CPU (on the ``meta`` device). The GPU to GPU paths themselves
(CUDA IPC) are in tests/test_gpu.py (CUDA only).
"""

from __future__ import annotations

import logging

import pytest
import shm_transport
import torch
from helpers import assert_same, assert_same_tensors

import shardopt
from shardopt.actor.host import ShardHost
from shardopt.client.transport import ClientSide, check_transport, choose
from shardopt.core.buffers import FlatLayout, to_numpy
from shardopt.core.param_groups import place_state
from shardopt.core.records import ParamBlock, ShardSpec, StepRequest

CUDA0 = torch.device("cuda", 0)
GPU_ACTOR = ClientSide(node_id="n1", in_actor=True, gpu_ids=("0",), nixl=False)
GPU_HOST = {"device": "cuda:0", "node_id": "n1", "gpu_ids": ["0"], "nixl": False}


def test_refusals_name_the_reason():
    for two_sided in ("gloo", "nccl"):
        with pytest.raises(ValueError, match="two-sided.*ray.put and ray.get refuse them"):
            check_transport(two_sided)
    with pytest.raises(ValueError, match="Invalid transport: 'tcp'"):
        check_transport("tcp")
    with pytest.raises(ValueError, match="shard groups and gateways choose"):
        check_transport("cuda_ipc", group="g")
    with pytest.raises(ValueError, match="shard groups and gateways choose"):
        check_transport("object_store", address="127.0.0.1:1")
    assert check_transport("auto", group="g", address=None) == "auto"
    with pytest.raises(ValueError, match="two-sided"):  # before any shard is made
        shardopt.AdamW([torch.zeros(2, requires_grad=True)], transport="nccl")


def test_choice_per_shard():
    cuda = {CUDA0}
    assert choose("auto", GPU_ACTOR, GPU_HOST, cuda, False) == ("cuda_ipc", "")
    assert choose("cuda_ipc", GPU_ACTOR, GPU_HOST, cuda, False) == ("cuda_ipc", "")
    assert choose("auto", GPU_ACTOR, GPU_HOST, cuda, True) == ("shared_memory", "")
    assert choose("object_store", GPU_ACTOR, GPU_HOST, cuda, False) == ("object_store", "")
    driver = ClientSide("n1", in_actor=False, gpu_ids=(), nixl=False)
    cases = {  # what stops CUDA IPC: auto falls back quietly, an explicit request says why
        "not all on CUDA": (GPU_ACTOR, GPU_HOST, {torch.device("cpu")}),
        "not a Ray actor": (driver, GPU_HOST, cuda),
        "another node": (GPU_ACTOR, {**GPU_HOST, "node_id": "n2"}, cuda),
        "not on this process's GPU": (GPU_ACTOR, {**GPU_HOST, "gpu_ids": ["1"]}, cuda),
        "on CUDA": (GPU_ACTOR, {**GPU_HOST, "device": "cpu"}, cuda),
    }
    for reason, (client, host, devices) in cases.items():
        assert choose("auto", client, host, devices, False) == ("object_store", "")
        transport, why = choose("cuda_ipc", client, host, devices, False)
        assert transport == "object_store" and reason in why, (reason, why)
    nixl_client = ClientSide("n1", False, (), nixl=True)
    assert choose("nixl", nixl_client, {**GPU_HOST, "nixl": True}, cuda, False)[0] == "nixl"
    assert choose("nixl", nixl_client, GPU_HOST, cuda, False)[0] == "object_store"


def test_state_placed_as_torch_places_it():
    """torch keeps a parameter's state on its device, ``step`` on the CPU unless fused or
    capturable; a CUDA client's state_dict() gets the same (here ``meta`` stands in for CUDA:
    the rule is the device, whatever it is)."""
    state = {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "list": [torch.zeros(1)], "n": 1}
    meta = torch.device("meta")
    cases = (({}, "cpu"), ({"fused": True}, "meta"), ({"capturable": True}, "meta"))
    for options, step_device in cases:
        placed = place_state(state, meta, options)
        assert placed["step"].device.type == step_device
        assert placed["exp_avg"].device == meta and placed["list"][0].device == meta
        assert placed["n"] == 1
    same = place_state(state, torch.device("cpu"), {"fused": True})
    assert same["exp_avg"] is state["exp_avg"]  # already in place: not copied


def test_direct_step_matches_torch_bit_for_bit():
    """The shard's side of a direct step, on a plain ShardHost (no Ray): the gradient buffer
    arrives as a tensor, the parameters leave as one; AdamW as torch runs it (fused)."""
    torch.manual_seed(3)
    tensors = [torch.randn(5, 3), torch.randn(4)]
    layout = FlatLayout.for_tensors(tensors)
    block = ParamBlock((0, 1), (0, 0), layout, to_numpy(layout.pack(tensors)))
    options = {"lr": 0.01, "weight_decay": 0.1}
    host = ShardHost()
    host.create("t/0", 0, ShardSpec(torch.optim.AdamW, options, (options,), block))
    reference = [t.clone() for t in tensors]
    torch_opt = torch.optim.AdamW(reference, **options, fused=True)
    for step_id in range(3):
        grads = [torch.randn_like(t) for t in tensors]
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch_opt.step()
        request = StepRequest(step_id, ({**options, "fused": None},), None, (True, True), {})
        result, flat = host.step_direct("t/0", request, layout.pack(grads))
        assert result.step_id == step_id and result.params is None
        assert_same_tensors([layout.view(flat, i) for i in range(2)], reference)
    again, flat = host.step_direct("t/0", request, layout.pack([torch.ones(5, 3), torch.ones(4)]))
    assert again.step_id == 2  # a repeat: applied once, its gradients ignored
    assert_same_tensors([layout.view(flat, i) for i in range(2)], reference)


def test_shard_status_names_each_shards_transport(caplog):
    model = torch.nn.Linear(3, 2)
    with shardopt.AdamW(model.parameters(), num_shards=1) as opt:
        assert [s.transport for s in opt.shard_status()] == ["shared_memory"]
    with shardopt.AdamW(model.parameters(), num_shards=1, transport="object_store") as opt:
        assert [s.transport for s in opt.shard_status()] == ["object_store"]
        assert opt.uses_shared_memory == [False]
        model(torch.randn(4, 3)).sum().backward()
        opt.step()  # the object store path still steps
    with caplog.at_level(logging.WARNING, logger="shardopt.client.transport"):
        with shardopt.AdamW(
            model.parameters(), num_shards=1, transport="cuda_ipc", shared_memory=False
        ) as opt:
            assert [s.transport for s in opt.shard_status()] == ["object_store"]
    assert "no 'cuda_ipc'" in caplog.text and "not all on CUDA" in caplog.text


def test_steps_through_a_registered_one_sided_transport_match_torch():
    """shardopt's RDT data path end to end on a CPU: the client puts its gradient buffer with
    the transport, each shard host (made with ``enable_tensor_transport``) receives it as a
    tensor and answers with its parameters through it; bit-identical to torch's fused AdamW."""
    shm_transport.register()  # before the hosts that use it are made
    torch.manual_seed(5)
    init = [torch.randn(40, 8), torch.randn(8), torch.randn(())]
    params = [t.clone().requires_grad_() for t in init]
    ref = [t.clone().requires_grad_() for t in init]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    with shardopt.AdamW(
        params, lr=1e-2, weight_decay=0.1, num_shards=2, transport="shm_test"
    ) as opt:
        assert [s.transport for s in opt.shard_status()] == ["shm_test"] * 2
        for _ in range(3):
            grads = [torch.randn_like(t) for t in init]
            for p, r, g in zip(params, ref, grads):
                p.grad, r.grad = g.clone(), g.clone()
            opt.step()
            torch_opt.step()
            assert_same_tensors(params, ref)
        assert_same(opt.state_dict()["state"], torch_opt.state_dict()["state"], "state", 0.0)
        assert [s.transport for s in opt.shard_status()] == ["shm_test"] * 2  # no fallback
