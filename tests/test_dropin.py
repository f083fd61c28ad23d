"""Drop-in holes found by running shardopt as users do, each pinned to torch's numbers.

- ``add_param_group`` in every pattern: new parameters on all, some or none of the shards,
  before and after the first step, over shared memory and the object store, with ``overlap``
  and ``share_params``.
- ``torch.amp.GradScaler``'s standard loop (with and without ``unscale_`` and clipping, with a
  skipped inf step), with and without ``overlap``: torch's fused kernels take the scale as
  torch's own fused optimizers do; other algorithms are unscaled as GradScaler unscales them.
- ``torch.compile`` around ``opt.step()`` (torch's "compiling the optimizer" recipe).
- Param groups holding what torch lets them hold: names, a lambda, an object of a local class.
- Parameters clipped between steps (WGAN), through the tensor and through ``p.data``.
- Gradient accumulation over micro-batches, with autocast, a GradScaler, clipping and
  ``overlap``.
- DataLoader workers forked while the optimizer lives.
- DistributedDataParallel (2 gloo ranks, each with its own optimizer), with ``overlap``.
- Warnings as errors (``python -W error``) with sparse gradients: no warning torch gives not.
"""

from __future__ import annotations

import copy
import math
import socket

import pytest
import ray
import torch
from helpers import (
    assert_same_state_dict,
    assert_same_tensors,
    make_model,
    same_state_dict,
    square_step,
)
from reference import run_as_shards
from torch import nn

import shardopt

# ----- add_param_group ------------------------------------------------------------------------

SHAPES = [(7,), (12, 8), (16, 16)]
"""On 2 shards: (16, 16) on shard 0, the other two on shard 1 (the plan balances bytes and a
cost per tensor, which these tiny tensors' bytes are far below: shard 1 holds two tensors to
shard 0's one; whole tensors, ``split=False``: tests/test_split.py covers pieces)."""
NEW = {
    "all": [(30, 30), (4,)],  # (30, 30) to shard 0 (one tensor fewer), then (4,) to shard 1
    "some": [(5, 5)],  # to shard 0 only: shard 1 gets nothing new
    "none": [],  # an empty group: no shard gets anything
}
DATA_PATHS = {
    "shm": dict(shared_memory=True),
    "object_store": dict(shared_memory=False),
    "shm-overlap": dict(shared_memory=True, overlap=True),
    "object_store-overlap": dict(shared_memory=False, overlap=True),
    "share_params": dict(shared_memory=True, share_params=True),
    "share_params-overlap": dict(shared_memory=True, share_params=True, overlap=True),
}


def _tensors(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _loss(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    return sum(
        ((p - torch.randn(p.shape, generator=gen)) ** 2).sum() * (i + 1)
        for i, p in enumerate(params)
    )


@pytest.mark.parametrize("data_path", list(DATA_PATHS))
@pytest.mark.parametrize("added_at", [0, 2], ids=["before-first-step", "after-two-steps"])
@pytest.mark.parametrize("lands_on", list(NEW))
def test_add_param_group_in_every_pattern(data_path, added_at, lands_on):
    runs = []
    for sharded in (True, False):
        params, extra = _tensors(SHAPES, 0), _tensors(NEW[lands_on], 1)
        if sharded:
            opt = shardopt.SGD(
                params, lr=0.05, momentum=0.9, num_shards=2, split=False, **DATA_PATHS[data_path]
            )
            assert opt.plan.owners == (1, 1, 0)
        else:
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        trajectory = []
        for k in range(4):
            if k == added_at:
                opt.add_param_group({"params": extra, "lr": 0.02})
                if sharded:
                    owners = opt.plan.owners[len(SHAPES) :]
                    assert set(owners) == {"all": {0, 1}, "some": {0}, "none": set()}[lands_on]
            opt.zero_grad()
            _loss(params + (extra if k >= added_at else []), k).backward()
            opt.step()
            trajectory.append([p.detach().clone() for p in params + extra])
        runs.append((trajectory, opt.state_dict()))
        if sharded:
            opt.close()
    (got, got_state), (want, want_state) = runs
    for k, (a, b) in enumerate(zip(got, want)):
        assert_same_tensors(a, b), k
    assert_same_state_dict(got_state, want_state)


# ----- GradScaler -------------------------------------------------------------------------------

SCALED = {
    # shardopt's default AdamW runs torch's fused kernel: the reference is torch's fused AdamW
    "AdamW-default": (
        lambda ps, **kw: shardopt.AdamW(ps, lr=1e-2, num_shards=2, **kw),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    ),
    "AdamW-for-loop": (
        lambda ps, **kw: shardopt.AdamW(ps, lr=1e-2, fused=False, num_shards=2, **kw),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=False),
    ),
    "SGD-momentum": (
        lambda ps, **kw: shardopt.SGD(ps, lr=1e-2, momentum=0.9, num_shards=2, **kw),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ),
}
INF_STEP = 2


def _scaled_run(opt, model, clip):
    """GradScaler's standard loop; step INF_STEP overflows (and must be skipped)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    trajectory = []
    for k in range(6):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(8, 6, generator=gen)
        if k == INF_STEP:
            x[0, 0] = math.inf
        loss = nn.functional.mse_loss(model(x), torch.zeros(8, 2))
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        trajectory.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    return trajectory


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "object_store"])
@pytest.mark.parametrize("overlap", [False, True], ids=["", "overlap"])
@pytest.mark.parametrize("clip", [False, True], ids=["scaled", "unscale_-clip"])
@pytest.mark.parametrize("algorithm", list(SCALED))
def test_grad_scaler_standard_loop_gives_torchs_numbers(algorithm, clip, overlap, shared_memory):
    make_sharded, make_torch = SCALED[algorithm]
    sharded_model, torch_model = make_model(), make_model()
    opt = make_sharded(sharded_model.parameters(), overlap=overlap, shared_memory=shared_memory)
    ref = make_torch(torch_model.parameters())
    got, want = _scaled_run(opt, sharded_model, clip), _scaled_run(ref, torch_model, clip)
    assert want[INF_STEP][1] == want[INF_STEP - 1][1] / 2  # the reference did skip a step
    assert_same_tensors(want[INF_STEP][0], want[INF_STEP - 1][0])
    for k, ((params, scale), (ref_params, ref_scale)) in enumerate(zip(got, want)):
        assert scale == ref_scale, k
        assert_same_tensors(params, ref_params)
    got_state, want_state = opt.state_dict(), ref.state_dict()
    for group in got_state["param_groups"] + want_state["param_groups"]:
        group.pop("fused")  # shardopt reports the user's choice (None), not the kernel it ran
    assert_same_state_dict(got_state, want_state)
    opt.close()


def test_grad_scaler_skips_an_inf_step_on_every_shard():
    """An inf in one shard's gradients skips the step on the other shard too."""
    model = make_model()
    opt = shardopt.SGD(model.parameters(), lr=0.1, momentum=0.9, num_shards=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.functional.mse_loss(model(torch.randn(4, 6)), torch.zeros(4, 2))).backward()
    owners = opt.plan.owners  # a parameter on the other shard than the first one's
    elsewhere = list(model.parameters())[max(i for i, o in enumerate(owners) if o != owners[0])]
    with torch.no_grad():
        elsewhere.grad[0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert_same_tensors([p.detach() for p in model.parameters()], before)
    assert [s.last_step_id for s in opt.shard_status()] == [0, 0]  # asked, and skipped
    assert opt.state_dict()["state"] == {}  # torch's SGD, skipped, made no momentum buffers
    opt.close()


def test_reference_helper_takes_the_scale_where_shards_fuse():
    opt = run_as_shards(torch.optim.AdamW(make_model().parameters()))
    assert opt._step_supports_amp_scaling


# ----- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_step_equals_torch(backend):
    """torch's recipe: ``torch.compile`` a function that calls ``opt.step()``."""
    torch._dynamo.reset()
    models = [make_model(), make_model()]
    opt = shardopt.AdamW(models[0].parameters(), lr=1e-2, num_shards=2)
    ref = run_as_shards(torch.optim.AdamW(models[1].parameters(), lr=1e-2))
    steps = [torch.compile(o.step, backend=backend) for o in (opt, ref)]
    for k in range(3):
        for model, o, step in zip(models, (opt, ref), steps):
            o.zero_grad()
            gen = torch.Generator().manual_seed(k)
            model(torch.randn(5, 6, generator=gen)).square().mean().backward()
            step()
        assert_same_tensors(list(models[0].parameters()), list(models[1].parameters()))
    assert_same_state_dict(opt.state_dict(), ref.state_dict())
    opt.close()


def test_compiled_training_step_equals_torch():
    """The whole step compiled (forward, backward, optimizer) with graph breaks at the shards."""
    torch._dynamo.reset()
    models = [make_model(), make_model()]
    opt = shardopt.SGD(models[0].parameters(), lr=0.1, momentum=0.9, num_shards=2)
    ref = torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=0.9)

    def train(model, o, x):
        o.zero_grad()
        model(x).square().mean().backward()
        o.step()

    compiled = torch.compile(train, backend="aot_eager")
    for k in range(3):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(k))
        compiled(models[0], opt, x)
        compiled(models[1], ref, x)
        assert_same_tensors(list(models[0].parameters()), list(models[1].parameters()))
    opt.close()


# ----- what param groups may hold --------------------------------------------------------------


class _Tag:  # a class plain pickle cannot find by name once it is local (below)
    pass


@pytest.mark.parametrize("shared_memory", [None, False], ids=["lane", "object-store"])
def test_param_groups_holding_callables_and_objects_step_as_torch(shared_memory):
    """torch keeps whatever a param group holds; code puts names, callables and objects there
    (a per-group clip function, a module reference). The step lane pickled its requests with
    plain pickle and failed on a lambda (``PicklingError``) where Ray's own path took it."""

    class Local(_Tag):
        pass

    def groups(model):
        return [
            {
                "params": list(model[0].parameters()),
                "name": "enc",
                "clip": lambda g: g.clamp(-1, 1),
            },
            {"params": list(model[2:].parameters()), "owner": Local(), "lr": 0.05},
        ]

    model, twin = make_model(0), make_model(0)
    opt = shardopt.SGD(
        groups(model), lr=0.1, momentum=0.9, num_shards=2, shared_memory=shared_memory
    )
    want = torch.optim.SGD(groups(twin), lr=0.1, momentum=0.9)
    try:
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(4, 6, generator=gen)
            for m, o in ((model, opt), (twin, want)):
                square_step(m, o, x)
        assert_same_tensors(list(model.parameters()), list(twin.parameters()))
        got, expected = opt.state_dict(), want.state_dict()
        assert_same_state_dict(
            {"state": got["state"], "param_groups": []},
            {"state": expected["state"], "param_groups": []},
        )
        assert [g["name"] for g in opt.param_groups[:1]] == ["enc"]
    finally:
        opt.close()


# ----- parameters written between steps --------------------------------------------------------


@pytest.mark.parametrize("write", ["no_grad", "data+push_params", "data+share_params"])
def test_a_critic_clipped_between_steps_as_wgan_does_gives_torchs_numbers(write):
    """WGAN clips its critic's weights after every step. Through the tensor under
    ``torch.no_grad()`` the clip moves the version counters and reaches the shards; through
    ``p.data`` it does not, and ``push_params()`` (or ``share_params=True``) is what the README
    says to use: each gives torch's numbers."""
    model, twin = make_model(0), make_model(0)
    options = {"share_params": True} if write == "data+share_params" else {}
    opt = shardopt.RMSprop(model.parameters(), lr=5e-3, num_shards=2, **options)
    want = torch.optim.RMSprop(twin.parameters(), lr=5e-3)

    def clip(m, o):
        for p in m.parameters():
            if write == "no_grad" or o is want:
                with torch.no_grad():
                    p.clamp_(-0.05, 0.05)
            else:
                p.data.clamp_(-0.05, 0.05)
        if write == "data+push_params" and o is opt:
            o.push_params()

    try:
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = torch.randn(4, 6, generator=gen)
            for m, o in ((model, opt), (twin, want)):
                square_step(m, o, x)
                clip(m, o)
        assert_same_tensors(list(model.parameters()), list(twin.parameters()))
    finally:
        opt.close()


# ----- gradient accumulation (HF Trainer, Lightning's accumulate_grad_batches) ----------------


@pytest.mark.parametrize(
    "options",
    [{}, {"overlap": True}, {"overlap": True, "share_params": True}, {"shared_memory": False}],
    ids=str,
)
def test_accumulated_gradients_scaled_and_clipped_give_torchs_numbers(options):
    """Three micro-batches per step under autocast and a GradScaler (one step's scale
    overflows and is skipped), ``unscale_``, clipping, ``zero_grad(set_to_none=False)`` every
    other step: with ``overlap`` each backward's hooks send a gradient that the next backward
    adds to in place, and only the last one counts."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 6, generator=gen) for _ in range(12)]
    model, twin = make_model(0), make_model(0)
    opt = shardopt.AdamW(model.parameters(), lr=0.01, foreach=False, num_shards=2, **options)
    want = torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2) for _ in "ab"]
    try:
        for step in range(4):
            for m, o, scaler in ((model, opt, scalers[0]), (twin, want, scalers[1])):
                for x in xs[3 * step : 3 * step + 3]:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = m(x).square().mean() / 3
                    scaler.scale(loss * (1e30 if step == 1 else 1)).backward()
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
                scaler.step(o)
                scaler.update()
                o.zero_grad(set_to_none=step % 2 == 0)
            assert_same_tensors(list(model.parameters()), list(twin.parameters()))
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_state_dict(opt.state_dict(), want.state_dict())
    finally:
        opt.close()


# ----- DataLoader workers forked from the training process -----------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"share_params": True, "overlap": True}, {"shared_memory": False}], ids=str
)
def test_dataloader_workers_forked_with_the_optimizer_alive_change_nothing(options):
    """``DataLoader(num_workers=2)`` forks its workers (Linux's default) each epoch while the
    optimizer lives: they inherit the proxy, its lanes and its shared-memory mappings, and exit
    with them; the optimizer steps on as torch's."""
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(48, 6, generator=torch.Generator().manual_seed(2)))
    model, twin = make_model(0), make_model(0)
    opt = shardopt.AdamW(model.parameters(), lr=0.01, foreach=False, num_shards=2, **options)
    want = torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)
    try:
        for _ in range(2):
            loader = DataLoader(data, batch_size=16, num_workers=2, multiprocessing_context="fork")
            for (x,) in loader:
                square_step(model, opt, x)
                square_step(twin, want, x)
        assert_same_tensors(list(model.parameters()), list(twin.parameters()))
        assert_same_state_dict(opt.state_dict(), want.state_dict())
    finally:
        opt.close()


# ----- DistributedDataParallel ----------------------------------------------------------------


class DDPRank:
    """One rank of a 2-process ``DistributedDataParallel`` job (a Ray actor): a DDP model
    stepped by torch's Adam as shards run it (fused) and its twin stepped by ``shardopt.Adam``
    (its own shards), on this rank's own data."""

    def run(self, rank: int, port: int, bucket_view: bool, overlap: bool) -> dict:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
        try:
            base = make_model(0)
            ref, mine = (
                DistributedDataParallel(copy.deepcopy(base), gradient_as_bucket_view=bucket_view)
                for _ in range(2)
            )
            want = run_as_shards(torch.optim.Adam(ref.parameters(), lr=0.01))
            opt = shardopt.Adam(mine.parameters(), lr=0.01, num_shards=2, overlap=overlap)
            try:
                same = []
                for step in range(3):
                    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(10 * step + rank))
                    square_step(ref, want, x)
                    square_step(mine, opt, x)
                    same.append(all(map(torch.equal, ref.parameters(), mine.parameters())))
                state = same_state_dict(opt.state_dict(), want.state_dict())
                return {
                    "same": same,
                    "state": state,
                    "params": [p.detach() for p in ref.parameters()],
                }
            finally:
                opt.close()
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks():
    ranks = [ray.remote(num_cpus=0)(DDPRank).remote() for _ in range(2)]
    yield ranks
    for rank in ranks:
        ray.kill(rank)


@pytest.mark.parametrize("overlap", [False, True], ids=["after-backward", "overlap"])
@pytest.mark.parametrize("bucket_view", [False, True], ids=["copied-grads", "bucket-view"])
def test_distributed_data_parallel_ranks_step_as_torch(ddp_ranks, bucket_view, overlap):
    """Each DDP rank with its own shardopt optimizer gets torch's numbers every step: DDP's
    averaged gradients reach the shards, also when ``overlap`` ships gradients during backward
    (before DDP's all-reduce has written the average), and with gradients that are views of
    DDP's buckets."""
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = ray.get(
        [r.run.remote(rank, port, bucket_view, overlap) for rank, r in enumerate(ddp_ranks)],
        timeout=120,
    )
    for result in results:
        assert result["same"] == [True, True, True]
        assert result["state"]
    assert_same_tensors(results[0]["params"], results[1]["params"])  # the ranks averaged


# ----- warnings -------------------------------------------------------------------------------

SPARSE_UNDER_WARNINGS_AS_ERRORS = """
import warnings, ray, torch, shardopt
ray.init(address={address!r})
warnings.simplefilter("error", UserWarning)  # as `python -W error` or pytest's filterwarnings
hosts = {{"runtime_env": {{"env_vars": {{"PYTHONWARNINGS": "error::UserWarning"}}}}}}

def train(make, scaler=None):
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)
    opt = make(emb, head)
    for rows in ([1, 4, 1], [0, 9], [2, 4, 7, 3]):
        opt.zero_grad()
        loss = head(emb(torch.tensor(rows))).pow(2).sum()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    params = [p.detach().clone() for p in (*emb.parameters(), *head.parameters())]
    if hasattr(opt, "close"):
        opt.close()
    return params

def same(a, b):
    assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b)), (a, b)

same(train(lambda e, h: shardopt.SparseAdam(e.parameters(), lr=0.1, num_shards=2,
                                            actor_options=hosts)),
     train(lambda e, h: torch.optim.SparseAdam(e.parameters(), lr=0.1)))
both = lambda e, h: [*e.parameters(), *h.parameters()]
scaler = lambda: torch.amp.GradScaler("cpu", init_scale=16.0)
same(train(lambda e, h: shardopt.SGD(both(e, h), lr=0.1, num_shards=2, actor_options=hosts),
           scaler()),
     train(lambda e, h: torch.optim.SGD(both(e, h), lr=0.1), scaler()))
print("no warnings")
"""


def test_sparse_gradients_raise_no_warning_torch_does_not_raise():
    """Sparse gradients (SparseAdam; SGD under a GradScaler) under warnings as errors, in the
    client and in the shard hosts: torch 2.13 warns ("Sparse invariant checks are implicitly
    disabled") at every sparse tensor made without ``check_invariants``, and shardopt made
    some where these torch optimizers make none, so `python -W error` (or pytest's
    ``filterwarnings = error``) failed on shardopt's first sparse step. (torch's own Adagrad
    makes one and fails so itself.) In a process of its own (torch warns once per process),
    joined to this session's Ray."""
    import subprocess
    import sys

    script = SPARSE_UNDER_WARNINGS_AS_ERRORS.format(address=ray.get_runtime_context().gcs_address)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and "no warnings" in done.stdout, done.stderr[-6000:]
