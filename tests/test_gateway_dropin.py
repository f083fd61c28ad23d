"""Remote sessions through a real gateway (gRPC on 127.0.0.1) run as users run them, each pinned
to torch's numbers bit for bit.

- ``torch.amp.GradScaler``'s standard loop (with and without ``unscale_`` and clipping, a step
  whose gradients overflow, an lr scheduler stepping every step) on a plain session: the client
  unscales as GradScaler unscales a plain optimizer and skips the step on an inf.
- ``torch.compile`` around ``opt.step()`` and around the whole training step, with OneCycleLR
  changing ``lr`` (and Adam's ``betas``) every step: each step's values reach the shards.
- The members of a sync shard group over the gateway under GradScaler: the same run as the
  in-cluster group's (:func:`group_workers.scaled_sync_run`).
"""

from __future__ import annotations

import uuid

import grpc
import pytest
import torch
from gateway_helpers import TOKEN, auth, close_session, code_of, open_session, pull, push, step
from group_workers import (
    INF_STEP,
    STEPS,
    assert_group_state,
    assert_same_runs,
    grad_scaler,
    halving,
    make_model,
    scaled_steps,
    scaled_sync_run,
    user_batches,
)
from helpers import assert_same, assert_same_state_dict, loss_of
from reference import run_as_shards

import shardopt
from shardopt.core.proto import pb
from shardopt.gateway import Limits, serve

LR = 0.05
ALGORITHMS = {
    # the shards run torch's fused AdamW: the reference takes the scale into the kernel too
    "AdamW": (shardopt.AdamW, torch.optim.AdamW, {"lr": LR}),
    "SGD-momentum": (shardopt.SGD, torch.optim.SGD, {"lr": LR, "momentum": 0.9}),
}


@pytest.fixture(scope="module")
def gateway():
    gw = serve(
        "127.0.0.1",
        0,
        tokens=[TOKEN],
        limits=Limits(max_session_bytes=16 << 20, idle_shard_hosts=2),
    )
    yield gw
    gw.stop(1)


def remote_and_torch(address, algorithm="AdamW"):
    """A remote session of two shards and its torch twin, each with its own seeded model."""
    sharded, plain, hyper = ALGORITHMS[algorithm]
    models = [make_model(0), make_model(0)]
    remote = sharded(models[0].parameters(), num_shards=2, address=address, token=TOKEN, **hyper)
    return models, remote, run_as_shards(plain(models[1].parameters(), **hyper))


def test_remote_state_changed_in_place_reaches_the_gateway_as_in_torch(address):
    """``opt.state[p]["exp_avg"].zero_()`` (a moment reset, as pruning or re-warming code does)
    through a remote session: the change reaches the gateway's shards before the next step,
    which is torch's; so does ``del opt.state[p]`` (that parameter starts afresh, last in the
    state dict's order)."""
    models, remote, local = remote_and_torch(address)
    try:
        for k in range(3):
            gen = torch.Generator().manual_seed(k)
            x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)
            for model, opt in zip(models, (remote, local)):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                opt.step()
                if k == 0:
                    opt.state[next(model.parameters())]["exp_avg"].zero_()
                if k == 1:
                    del opt.state[list(model.parameters())[1]]
            assert_same(list(models[0].parameters()), list(models[1].parameters()))
        assert_same_state_dict(remote.state_dict(), local.state_dict())
    finally:
        remote.close()


@pytest.mark.parametrize("clip", [False, True], ids=["scaled", "unscale_-clip"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_remote_grad_scaler_loop_with_a_scheduler_gives_torchs_numbers(address, algorithm, clip):
    models, remote, ref = remote_and_torch(address, algorithm)
    data = user_batches(0, inf_ranks=(0,))
    got = scaled_steps(models[0], remote, grad_scaler(), data, clip, halving(remote))
    want = scaled_steps(models[1], ref, grad_scaler(), data, clip, halving(ref))
    assert want[INF_STEP][1] == want[INF_STEP - 1][1] / 2  # the reference did skip a step
    assert_same_runs([got], [want])
    assert_same_state_dict(remote.state_dict(), ref.state_dict())
    if algorithm == "AdamW":  # one step of the shards' state was skipped
        assert [s["step"].item() for s in remote.state_dict()["state"].values()] == [STEPS - 1] * 4
    remote.close()


@pytest.mark.parametrize("compiled", ["step", "training-step"])
def test_compiled_remote_step_with_a_scheduler_gives_torchs_numbers(address, compiled):
    torch._dynamo.reset()
    models, remote, ref = remote_and_torch(address)
    runs = []
    for model, opt in zip(models, (remote, ref)):
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)
        if compiled == "step":
            step = torch.compile(opt.step, backend="eager")

            def train(x, y, model=model, opt=opt, step=step):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                step()

        else:

            @torch.compile(backend="eager")
            def train(x, y, model=model, opt=opt):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                opt.step()

        trajectory = []
        for x, y in user_batches(0):
            train(x, y)
            scheduler.step()
            group = opt.param_groups[0]
            params = [p.detach().clone() for p in model.parameters()]
            trajectory.append((params, group["betas"][0], group["lr"]))
        runs.append(trajectory)
    assert len({lr for _, _, lr in runs[1]}) == STEPS  # a new lr (and beta1) every step
    assert_same_runs(*([run] for run in runs))
    assert_same_state_dict(remote.state_dict(), ref.state_dict())
    remote.close()


@pytest.mark.parametrize("inf_ranks", [(0, 1), (1,)], ids=["both-overflow", "one-overflows"])
def test_group_members_over_the_gateway_under_grad_scaler_give_torchs_numbers(address, inf_ranks):
    """Two sync members over gRPC, each unscaling and clipping its own gradients; at INF_STEP
    the members of ``inf_ranks`` overflow and vote to skip the round (``StepRequest.skip``), so
    the group's shards skip it and no member waits for another (one overflowing alone too)."""
    name = f"dropin-{uuid.uuid4().hex[:6]}"

    def member(model, rank):
        return shardopt.AdamW(
            model.parameters(), lr=LR, address=address, token=TOKEN, group=name, world_size=2,
            rank=rank, num_shards=2, timeout=10,
        )  # fmt: skip

    opts, reference = scaled_sync_run(member, True, LR, inf_ranks)
    assert [p.applied_version for p in opts[0].backend.last_pushes] == [STEPS - 1] * 2
    assert_group_state(opts[1], reference, 1)
    for opt in opts:
        opt.close()


def test_a_vote_to_skip_is_refused_outside_a_sync_group_and_changes_nothing(stub):
    """``StepRequest.skip`` is a sync group member's vote: a plain session's is refused
    (FAILED_PRECONDITION), and its staged gradients, parameters and state stay as they were (the
    next Step applies the staged gradients as torch would)."""
    params = [torch.ones(3), torch.ones(2)]
    session = open_session(stub, params, hyperparameters={"lr": 0.5}).session_id
    push(stub, session, [torch.ones(3), torch.ones(2)])
    skip = pb.StepRequest(session_id=session, skip=True)
    assert code_of(lambda: stub.Step(skip, metadata=auth())) == grpc.StatusCode.FAILED_PRECONDITION
    assert_same(pull(stub, session), params)
    step(stub, session)  # the gradients pushed before the refused vote
    assert_same(pull(stub, session), [torch.full((3,), 0.5), torch.full((2,), 0.5)])
    close_session(stub, session)
