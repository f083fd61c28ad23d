"""Shards on a GPU (marked ``gpu``; skipped without CUDA, so never on CI): scripts/gpu.sh runs
them on a GPU machine.

Every check is bit for bit against torch.optim on CUDA with the kernel the shard runs (fused
Adam/AdamW where the user chose no path, foreach SGD when asked): the same gradients go to both
(made on the CPU from a seed, so a CPU client and a GPU client see the same numbers). Covered:
a CPU client and a GPU client with GPU shards (``actor_options={"num_gpus": ...}``), state_dict
(state where torch keeps it) and its round trip, a checkpoint, a replicated shard, a 2-worker
shard group on ``shard_resources={"GPU": ...}``, and Ray Direct Transport (CUDA IPC) from a
client that is a Ray actor on the GPU its shards use.

Shards take a quarter of a GPU each, so a one-GPU machine holds a client actor and three shards;
idle shard hosts are stopped at once (``set_max_idle(0)``) so that they hand their GPU back.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

import shardopt
from shardopt.client.runtime import host_pool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

QUARTER = {"num_gpus": 0.25}
SHAPES = ((256, 128), (128,), (33, 7), ())


@pytest.fixture(scope="module", autouse=True)
def gpu_hosts_stop_when_idle():
    previous = host_pool.set_max_idle(0)
    yield
    host_pool.set_max_idle(previous)


def initial(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grads_for(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


class Pair:
    """A shardopt optimizer and torch's on CUDA, stepped with the same gradients."""

    def __init__(self, shard_cls, torch_cls, options, client="cpu", torch_options=None, **kw):
        self.params = [t.clone().to(client).requires_grad_() for t in initial()]
        self.ref = [t.clone().cuda().requires_grad_() for t in initial()]
        self.opt = shard_cls(self.params, **options, **kw)
        self.torch = torch_cls(self.ref, **options, **(torch_options or {}))
        self.steps = 0

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            grads = grads_for(self.steps)
            for p, r, g in zip(self.params, self.ref, grads):
                p.grad, r.grad = g.to(p.device), g.cuda()
            self.opt.step()
            self.torch.step()
            self.steps += 1
            self.assert_same()

    def assert_same(self) -> None:
        for i, (p, r) in enumerate(zip(self.params, self.ref)):
            assert torch.equal(p.detach().cpu(), r.detach().cpu()), f"param {i}, step {self.steps}"


def assert_same_state(got: dict, want: dict, devices: dict | None = None) -> None:
    assert sorted(got["state"]) == sorted(want["state"])
    for pid, state in want["state"].items():
        for key, value in state.items():
            mine = got["state"][pid][key]
            assert torch.equal(mine.cpu(), value.cpu()), (pid, key)
            if devices is not None:
                assert mine.device.type == devices[key], (pid, key, mine.device)


@pytest.mark.parametrize(
    "shard_cls, torch_cls, options, torch_options",
    [
        (shardopt.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, {"fused": True}),
        (shardopt.Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}, {"fused": True}),
        (shardopt.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "foreach": True}, {}),
    ],
    ids=["adamw-fused", "adam-fused", "sgd-foreach"],
)
@pytest.mark.parametrize("client", ["cpu", "cuda"])
def test_gpu_shards_match_torch_on_cuda(shard_cls, torch_cls, options, torch_options, client):
    pair = Pair(
        shard_cls, torch_cls, options, client, torch_options, num_shards=2, actor_options=QUARTER
    )
    statuses = pair.opt.shard_status()
    assert all(s.device == "cuda:0" for s in statuses), statuses
    assert all(s.transport == "object_store" for s in statuses)  # a driver: no RDT
    assert all(s.fused for s in statuses) == ("fused" in torch_options)
    pair.step(3)
    # state_dict: torch's numbers, where torch keeps them (the user chose no fused: step on CPU)
    where = {"step": "cpu"}
    if client == "cuda":
        where.update({k: "cuda" for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")})
        where["momentum_buffer"] = "cuda"
    else:
        where.update({k: "cpu" for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")})
        where["momentum_buffer"] = "cpu"
    saved = pair.opt.state_dict()
    assert_same_state(saved, pair.torch.state_dict(), where)
    # the round trip: a new optimizer loads it and goes on exactly as torch does
    again = Pair(
        shard_cls, torch_cls, options, client, torch_options, num_shards=1, actor_options=QUARTER
    )
    again.torch, again.ref, again.steps = pair.torch, pair.ref, pair.steps
    with torch.no_grad():
        for mine, p in zip(again.params, pair.params):
            mine.copy_(p)
    pair.opt.close()
    again.opt.load_state_dict(saved)
    again.step(2)
    again.opt.close()


def test_one_gpu_per_shard_and_checkpoint(tmp_path):
    """``actor_options={"num_gpus": 1}``: the whole GPU; a checkpoint from it resumes on
    shards of a quarter GPU, bit for bit."""
    pair = Pair(
        shardopt.AdamW, torch.optim.AdamW, {"lr": 1e-2}, "cuda", {"fused": True},
        num_shards=1, actor_options={"num_gpus": 1},
    )  # fmt: skip
    pair.step(2)
    pair.opt.save_checkpoint(tmp_path / "ckpt")
    pair.opt.close()
    resumed = Pair(
        shardopt.AdamW, torch.optim.AdamW, {"lr": 1e-2}, "cuda", {"fused": True},
        num_shards=2, actor_options=QUARTER,
    )  # fmt: skip
    resumed.torch, resumed.ref, resumed.steps = pair.torch, pair.ref, pair.steps
    with torch.no_grad():
        for mine, p in zip(resumed.params, pair.params):
            mine.copy_(p)
    resumed.opt.load_checkpoint(tmp_path / "ckpt")
    resumed.step(2)
    resumed.opt.close()


def test_replicated_gpu_shard():
    pair = Pair(
        shardopt.AdamW, torch.optim.AdamW, {"lr": 1e-2}, "cuda", {"fused": True},
        num_shards=1, actor_options=QUARTER, replicate=True,
    )  # fmt: skip
    pair.step(2)
    [primary] = pair.opt.backend.handles
    ray.kill(primary.host)  # its replica takes over; nothing is lost
    pair.step(2)
    assert_same_state(pair.opt.state_dict(), pair.torch.state_dict())
    pair.opt.close()


def test_two_worker_group_on_a_gpu_shard():
    """Two workers (threads here) of a sync group whose shard reserves a quarter GPU: each
    step averages their gradients as torch would see the mean, on CUDA."""
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    ref = [t.clone().cuda().requires_grad_() for t in initial()]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, fused=True)

    def work(rank: int) -> list[torch.Tensor]:
        params = [t.clone().cuda().requires_grad_() for t in initial()]
        opt = shardopt.AdamW(
            params, lr=1e-2, group=name, world_size=2, rank=rank, num_shards=1,
            placement="PACK", shard_resources={"GPU": 0.25}, timeout=60,
        )  # fmt: skip
        for step in range(3):
            for p, g in zip(params, grads_for(step)):
                p.grad = (g * (rank + 1)).cuda()
            opt.step()
        assert all(s.device == "cuda:0" for s in opt.shard_status())
        opt.close()
        return [p.detach().cpu() for p in params]

    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(work, range(2)))
    finally:
        shardopt.close_group(name)
    for step in range(3):
        for r, g in zip(ref, grads_for(step)):
            r.grad = ((g * 1).cuda() + (g * 2).cuda()) / 2
        torch_opt.step()
    for got, other, want in zip(results[0], results[1], ref):
        assert torch.equal(got, other)
        torch.testing.assert_close(got, want.detach().cpu(), rtol=0, atol=0)


class GpuClient:
    """A client that is itself a Ray actor on the GPU its shards use: the case for CUDA IPC."""

    def run(self, transport: str, steps: int) -> dict:
        pair = Pair(
            shardopt.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, "cuda",
            {"fused": True}, num_shards=2, actor_options=QUARTER, transport=transport,
        )  # fmt: skip
        transports = [s.transport for s in pair.opt.shard_status()]
        pair.step(steps)  # raises where a step differs from torch
        saved = pair.opt.state_dict()
        assert_same_state(saved, pair.torch.state_dict())
        after = [s.transport for s in pair.opt.shard_status()]
        pair.opt.close()
        return {"transports": transports, "after": after}


@pytest.mark.parametrize("transport", ["auto", "cuda_ipc", "object_store"])
def test_ray_direct_transport_from_a_gpu_actor(transport):
    client = ray.remote(GpuClient).options(num_gpus=0.25).remote()
    try:
        result = ray.get(client.run.remote(transport, 3), timeout=240)
    finally:
        ray.kill(client)
    want = "object_store" if transport == "object_store" else "cuda_ipc"
    assert result == {"transports": [want] * 2, "after": [want] * 2}, result
