"""Shard-group workers run as users run them, each pinned to torch's numbers bit for bit.

- ``torch.amp.GradScaler``'s standard loop (with and without ``unscale_`` and clipping, an lr
  scheduler stepping every step) on the workers of a sync group (shared memory and step lanes)
  and of an async group, with a step whose gradients overflow: skipped on every shard.
- ``torch.compile`` around ``opt.step()`` and around the whole training step, with an lr
  scheduler whose every new lr must reach the shards.
- ``overlap=True`` with a group is refused (a group member packs its gradients at ``step()``).
- Every worker's ``opt.state`` (which parameters have state, their state) follows the one state
  the group shares: what the others' pushes made, dropped or loaded (DCP's helpers and
  trainers decide by ``opt.state``'s emptiness).

The reference is :class:`group_workers.ReferenceGroup`: plain torch, the group's rule (rank-order
sum over the world size in sync mode, each push as it is in async mode) applied by hand.
"""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from group_workers import (
    INF_STEP,
    STEPS,
    ReferenceGroup,
    assert_group_state,
    assert_same_runs,
    grad_scaler,
    halving,
    make_model,
    plain_reference_run,
    scaled_steps,
    scaled_sync_run,
    user_batches,
)
from helpers import assert_same_state_dict, loss_of
from torch.distributed.checkpoint.state_dict import _init_optim_state

import shardopt
from shardopt.client.shard_group import list_groups

LR = 0.05


@pytest.fixture
def name():
    """A fresh group name, torn down after the test."""
    group = f"dropin-{uuid.uuid4().hex[:8]}"
    yield group
    shardopt.close_group(group)


def torch_adamw(params):
    """What a group's shards run for the default ``shardopt.AdamW``: torch's fused kernel."""
    return torch.optim.AdamW(params, lr=LR, fused=True)


def attach(name, model, rank, **options):
    """Rank ``rank`` of the two-worker group ``name`` (two shards), training ``model``."""
    options = {"world_size": 2, "rank": rank, "num_shards": 2, "timeout": 30, **options}
    return shardopt.AdamW(model.parameters(), lr=LR, group=name, **options)


DATA_PATHS = {
    "shm": ({}, ([True, True], 2)),  # gradient slots, parameter buffers, step lanes
    "object_store": ({"shared_memory": False}, ([False, False], 0)),
    "share_params": ({"share_params": True}, ([True, True], 2)),
}
"""A group worker's options, and what it then uses: (shared memory per shard, push lanes)."""


@pytest.mark.parametrize(
    ("clip", "data_path"),
    [(False, "shm"), (True, "shm"), (True, "object_store"), (True, "share_params")],
    ids=["scaled", "unscale_-clip", "unscale_-clip-object_store", "unscale_-clip-share_params"],
)
def test_sync_group_grad_scaler_loop_with_a_scheduler_gives_torchs_numbers(name, clip, data_path):
    """Both workers overflow at INF_STEP (as DDP's all-reduced gradients would on every rank):
    both skip, no shard changes, both scales shrink. Each worker unscales and clips its own
    gradients before the average (DDP clips the average)."""
    options, uses = DATA_PATHS[data_path]

    def member(model, rank):
        opt = attach(name, model, rank, **options)
        assert (opt.uses_shared_memory, len(opt.group.lanes)) == uses
        return opt

    opts, reference = scaled_sync_run(member, clip, LR)
    assert opts[0].group.versions == [STEPS] * 2  # both voted to skip: the round updated nothing
    assert_group_state(opts[0], reference, 0)
    for opt in opts:
        opt.close()


def test_a_sync_worker_that_overflows_alone_skips_the_round_for_every_worker(name):
    """GradScaler decides on each worker alone: at INF_STEP rank 1's scaler finds an inf, rank
    0's does not. Rank 1 still takes part in the round: it votes to skip it (a push without
    gradients), so the round updates no shard and nobody waits for a timeout, as one rank's inf
    skips a DDP step on every rank. Both workers' parameters and the state stay the
    reference's; the scales part ways (only rank 1's halves: DDP's ranks would share one)."""
    opts, reference = scaled_sync_run(
        lambda model, rank: attach(name, model, rank, timeout=10), False, LR, inf_ranks=(1,)
    )
    assert opts[0].group.versions == [STEPS] * 2  # the skipped round counts: no update
    assert_group_state(opts[0], reference, 0)
    assert [p["step"].item() for p in opts[1].state_dict()["state"].values()] == [STEPS - 1] * 4
    for opt in opts:
        opt.close()


def test_an_async_workers_state_dict_round_trip_keeps_the_others_pushes(name):
    """HF Trainer and Accelerate round-trip a new optimizer's state dict. In an async group the
    other workers push in between: the round trip must not put back the state as it was read
    (their pushes' moments and step counts would be lost while the parameters moved on)."""
    models = [make_model(0), make_model(0)]
    opts = [attach(name, models[r], r, mode="async") for r in range(2)]
    x, y = user_batches(0)[0]
    for opt, model in zip(opts, models):
        loss_of(model, x, y).backward()
        opt.step()
    read = opts[0].state_dict()  # rank 0's new optimizer's round trip starts
    for _ in range(3):  # rank 1 pushes meanwhile
        opts[1].zero_grad()
        loss_of(models[1], x, y).backward()
        opts[1].step()
    opts[0].load_state_dict(read)  # ... and ends
    assert [s["step"].item() for s in opts[0].state_dict()["state"].values()] == [5.0] * 4
    assert_same_state_dict(opts[0].state_dict(), opts[1].state_dict())
    for opt in opts:
        opt.close()


def test_async_group_grad_scaler_loop_skips_only_the_overflowing_worker(name):
    """Two async workers take turns (one thread: a fixed order of pushes); rank 1 overflows at
    INF_STEP and skips alone: its scale shrinks, rank 0's pushes go on being applied."""
    data = [user_batches(r, inf_ranks=(1,)) for r in range(2)]
    models = [make_model(0), make_model(0)]
    opts = [attach(name, models[r], r, mode="async") for r in range(2)]
    reference = ReferenceGroup(2, "async", torch_adamw)
    members = [reference.member(r) for r in range(2)]
    runs = {
        "shardopt": (models, opts, [grad_scaler(), grad_scaler()], [halving(o) for o in opts]),
        "torch": (
            reference.models,
            members,
            [grad_scaler(), grad_scaler()],
            [halving(m) for m in members],
        ),
    }
    got, want = [[], []], [[], []]
    for k in range(STEPS):
        for r in range(2):
            for label, out in (("shardopt", got), ("torch", want)):
                model, opt, scale, schedule = (part[r] for part in runs[label])
                out[r] += scaled_steps(model, opt, scale, data[r][k : k + 1], True, schedule)
    assert reference.rounds == 2 * STEPS - 1
    assert want[1][INF_STEP][1] == want[1][INF_STEP - 1][1] / 2
    assert want[0][INF_STEP][1] == want[0][INF_STEP - 1][1]  # (growth_interval 2: no growth)
    assert_same_runs(got, want)
    assert opts[1].group.versions == [2 * STEPS - 1] * 2  # rank 1 pushed last
    assert_group_state(opts[1], reference, 1)
    for opt in opts:
        opt.close()


@pytest.mark.parametrize("compiled", ["step", "training-step"])
def test_compiled_group_step_with_a_scheduler_gives_torchs_numbers(name, compiled):
    """``torch.compile(opt.step)`` (or the whole training step, with graph breaks at the
    push) on both workers of a sync group; OneCycleLR's new lr reaches the shards each step."""
    data = [user_batches(r) for r in range(2)]

    def one_cycle(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)

    def run(model, opt, rank):
        scheduler = one_cycle(opt)
        if compiled == "step":
            step = torch.compile(opt.step, backend="eager")

            def train(x, y):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                step()

        else:

            @torch.compile(backend="eager")
            def train(x, y):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()

        trajectory = []
        for x, y in data[rank]:
            train(x, y)
            scheduler.step()
            params = [p.detach().clone() for p in model.parameters()]
            trajectory.append((params, 1.0, opt.param_groups[0]["lr"]))
        return trajectory

    def work(rank):
        model = make_model(0)
        opt = attach(name, model, rank)
        return opt, run(model, opt, rank)

    torch._dynamo.reset()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    reference, want = plain_reference_run(data, one_cycle, LR)
    assert len({lr for _, _, lr in want[0]}) == STEPS  # a new lr every step
    assert_same_runs([trajectory for _, trajectory in results], want)
    assert_group_state(results[1][0], reference, 1)
    for opt, _ in results:
        opt.close()


def test_hf_and_lightning_style_loops_on_a_sync_group(name):
    """HF Trainer round-trips a fresh optimizer's state dict and reloads checkpoints with
    ``weights_only=True``; Lightning steps with a closure (forward and backward) and then its
    scheduler. On both workers of a sync group, at once."""
    data = [user_batches(r) for r in range(2)]

    def work(rank):
        model = make_model(0)
        opt = attach(name, model, rank)
        opt.load_state_dict(opt.state_dict())  # (before any step, as HF does)
        scheduler = halving(opt)
        trajectory = []
        for x, y in data[rank]:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            loss = opt.step(closure=closure)
            assert isinstance(loss, torch.Tensor)
            scheduler.step()
            params = [p.detach().clone() for p in model.parameters()]
            trajectory.append((params, 1.0, opt.param_groups[0]["lr"]))
        saved = io.BytesIO()
        torch.save(opt.state_dict(), saved)
        saved.seek(0)
        return opt, trajectory, torch.load(saved, weights_only=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    reference, want = plain_reference_run(data, halving, LR)
    assert_same_runs([trajectory for _, trajectory, _ in results], want)
    loaded, want = results[1][2], reference.state_dict(1)
    for group in loaded["param_groups"] + want["param_groups"]:
        group.pop("fused")
    assert_same_state_dict(loaded, want)
    for opt, _, _ in results:
        opt.close()


def test_overlap_with_a_group_is_refused(name):
    """A group member packs its gradients at ``step()``: ``overlap=True`` would be silently
    ignored, so it is refused (as with ``address=``), before any group is made."""
    with pytest.raises(ValueError, match="overlap"):
        shardopt.AdamW(make_model(0).parameters(), lr=LR, group=name, world_size=1, rank=0,
                       num_shards=1, overlap=True)  # fmt: skip
    assert name not in list_groups()


def _state_view(opt):
    """What a worker's ``opt.state`` says: (parameter index, the state's step) in its order."""
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return [(index[id(p)], float(state["step"])) for p, state in opt.state.items()]


def _push(members, only=None):
    """One step of each (optimizer, model) of ``members`` (in turn; a sync round's at once),
    with the gradients of the parameters numbered ``only`` alone (all by default)."""

    def step(member):
        opt, model = member
        opt.zero_grad()
        loss_of(model, *user_batches(opt.group.rank)[0]).backward()
        for i, p in enumerate(model.parameters()):
            if only is not None and i not in only:
                p.grad = None
        opt.step()

    if members[0][0].group.config.mode == "sync":
        with ThreadPoolExecutor(len(members)) as pool:
            list(pool.map(step, members))
    else:
        for member in members:
            step(member)


def test_an_async_worker_sees_the_state_the_others_made_dropped_and_loaded(name):
    """One state takes every worker's pushes, so every worker's ``opt.state`` must show it:
    rank 1 showed only what its own pushes created (after rank 0's first push, none at all:
    ``len(opt.state)`` 0 and ``opt.state[p]`` ``{}`` while the shards held state). A worker
    attaching to a group with state sees it at once: DCP's ``get_optimizer_state_dict`` steps
    an optimizer whose state is empty (zero gradients, lr 0: torch's ``_init_optim_state``),
    which on a group's shards would decay every moment and count a step. A state dropped or
    loaded by another worker shows at the worker's next push to the shards holding it."""
    models = [make_model(0), make_model(0)]
    first = attach(name, models[0], 0, mode="async")
    _push([(first, models[0])])
    _push([(first, models[0])])
    late = attach(name, models[1], 1, mode="async")
    opts = [first, late]
    assert _state_view(late) == _state_view(first) == [(i, 2.0) for i in range(4)]
    before = late.state_dict()
    _init_optim_state(late)  # as DCP's get_optimizer_state_dict does: must find the state
    assert_same_state_dict(late.state_dict(), before)

    _push(list(zip(opts, models)))  # the first push of each sees the other's
    assert _state_view(late) == _state_view(first) == [(i, 4.0) for i in range(4)]

    # rank 0 drops the state of parameter 1 (on the shard of 2; 0 and 3 are on the other) ...
    assert [late.backend.shard_map.shards_of(i) for i in range(4)] == [[0], [1], [1], [0]]
    del first.state[models[0][0].bias]
    _push([(late, models[1])], only=(0, 2, 3))  # ... rank 1 learns it at its next step
    assert _state_view(late) == [(0, 5.0), (2, 5.0), (3, 5.0)]
    assert models[1][0].bias not in late.state and len(late.state) == 3

    kept = first.state_dict()  # rank 0 loads a state dict with parameter 2's state only
    kept["state"] = {2: kept["state"][2]}
    first.load_state_dict(kept)
    _push([(late, models[1])], only=(0, 3))  # 0's and 3's state made afresh after the load
    assert sorted(_state_view(late)) == [(0, 1.0), (2, 5.0), (3, 1.0)]
    assert sorted(late.state_dict()["state"]) == [0, 2, 3]
    _push([(first, models[0])], only=(0, 1))  # rank 0 learns what rank 1's push made
    # the loaded state first, as torch keeps it; then each shard's in the order it gained them,
    # the shards' lists merged by id (torch's order has 3, made by rank 1's earlier push on
    # 0's shard, before 1, made now on the other: the merge cannot tell which came first)
    assert _state_view(first) == [(2, 5.0), (0, 2.0), (1, 1.0), (3, 1.0)]
    for opt in opts:
        opt.close()


def test_a_sync_worker_sees_a_state_another_worker_loaded(name):
    """Rank 0 alone loads a state dict between rounds (a resume on one rank): rank 1's
    ``opt.state`` follows at the next round, as rank 0's does (in torch's order on rank 0;
    rank 1 keeps the places of what it knew)."""
    models = [make_model(0), make_model(0)]
    opts = [attach(name, models[r], r, timeout=30) for r in range(2)]
    _push(list(zip(opts, models)))
    assert _state_view(opts[0]) == _state_view(opts[1]) == [(i, 1.0) for i in range(4)]
    kept = opts[0].state_dict()
    kept["state"] = {1: kept["state"][1], 3: kept["state"][3]}
    opts[0].load_state_dict(kept)
    assert len(opts[0].state) == 2
    _push(list(zip(opts, models)), only=(0, 1))
    assert _state_view(opts[0]) == [(1, 2.0), (3, 1.0), (0, 1.0)]
    assert list(opts[0].state_dict()["state"]) == [1, 3, 0]
    assert sorted(_state_view(opts[1])) == [(0, 1.0), (1, 2.0), (3, 1.0)]
    assert sorted(opts[1].state_dict()["state"]) == [0, 1, 3]
    for opt in opts:
        opt.close()
