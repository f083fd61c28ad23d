"""A step is all or nothing, as torch's is.

What torch refuses before it updates anything (a sparse gradient for a dense algorithm, a
dense one for SparseAdam, complex parameters an algorithm cannot take, a gradient of another
shape, dtype or device) is refused with torch's own exception before any shard is asked, and
every shard is left as it was. A failure on some shards after others applied the step (a user's
optimizer raising on one shard) is a :class:`~shardopt.PartialStepError` that names the shards;
with replicas every shard is rolled back first and nothing of the step is applied. A step every
shard refuses raises the shards' (torch's) own error.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from helpers import assert_same_state_dict, assert_same_tensors, interrupt_a_step, sgd_on_ones
from torch import nn

import shardopt

SHAPES = [(16, 16), (12, 8), (7,)]  # on 2 shards: (16, 16) alone on shard 0


def _params(dtypes=(torch.float32,) * 3):
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in zip(SHAPES, dtypes)]


def _backward(params, k):
    gen = torch.Generator().manual_seed(k)
    sum(
        (p * torch.randn(p.shape, generator=gen).to(p.dtype)).abs().sum() for p in params
    ).backward()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], opt.state_dict(), opt.shard_status()


def _assert_unchanged(opt, params, before):
    values, state, status = before
    assert_same_tensors([p.detach() for p in params], values)
    assert_same_state_dict(opt.state_dict(), state)
    assert [s.last_step_id for s in opt.shard_status()] == [s.last_step_id for s in status]


def _torch_refusal(make, params, set_grads):
    """What torch.optim raises for the same inputs (on copies)."""
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    opt = make(copies)
    set_grads(copies)
    with pytest.raises(Exception) as info:
        opt.step()
    return info.value


def _sparse_grad_on_last(params):
    for p in params[:-1]:
        p.grad = torch.ones_like(p)
    last = params[-1]
    last.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2), last.shape)


def _dense_grads(params):
    for p in params:
        p.grad = torch.ones_like(p)


REFUSED = {
    "sparse-grad-for-Adam": (
        lambda ps, **kw: shardopt.Adam(ps, lr=0.1, **kw),
        lambda ps: torch.optim.Adam(ps, lr=0.1),
        _sparse_grad_on_last,
        None,
    ),
    "dense-grad-for-SparseAdam": (
        lambda ps, **kw: shardopt.SparseAdam(ps, lr=0.1, **kw),
        lambda ps: torch.optim.SparseAdam(ps, lr=0.1),
        _dense_grads,
        None,
    ),
    "complex-param-for-Adafactor": (
        lambda ps, **kw: shardopt.Adafactor(ps, lr=0.1, **kw),
        lambda ps: torch.optim.Adafactor(ps, lr=0.1),
        _dense_grads,
        (torch.float32, torch.float32, torch.complex64),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_torch_refuses_is_refused_before_any_shard_steps(case):
    make_sharded, make_torch, set_grads, dtypes = REFUSED[case]
    params = _params(dtypes or (torch.float32,) * 3)
    want = _torch_refusal(make_torch, params, set_grads)
    opt = make_sharded(params, num_shards=2)
    if case == "dense-grad-for-SparseAdam":  # a first, valid step, so there is state to keep
        for p in params:
            p.grad = torch.sparse_coo_tensor(
                torch.tensor([[0]]), torch.ones(1, *p.shape[1:]), p.shape
            )
        opt.step()
    before = _snapshot(opt, params)
    set_grads(params)
    with pytest.raises(type(want)) as info:
        opt.step()
    assert str(info.value) == str(want)
    _assert_unchanged(opt, params, before)
    opt.close()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "object_store"])
@pytest.mark.parametrize(
    "mismatch", ["shape", "dtype", pytest.param("device", marks=[CUDA, pytest.mark.gpu])]
)
def test_a_gradient_unlike_its_parameter_is_refused(mismatch, shared_memory):
    params = _params()
    opt = shardopt.SGD(params, lr=0.1, momentum=0.9, num_shards=2, shared_memory=shared_memory)
    _backward(params, 0)
    opt.step()
    before = _snapshot(opt, params)
    _backward(params, 1)
    last = params[-1]
    # torch refuses such tensors when they are assigned to .grad; .data slips past that check
    wrong = {
        "shape": lambda: torch.ones(1),  # would broadcast silently into the shard's buffer
        "dtype": lambda: last.grad.detach().double(),
        "device": lambda: last.grad.detach().to("cuda"),
    }[mismatch]()
    try:
        last.grad.data = wrong
    except RuntimeError:
        pytest.skip(f"this torch refuses a gradient of another {mismatch} even through .data")
    with pytest.raises(RuntimeError, match=f"the gradient of parameter 2 .*{mismatch}"):
        opt.step()
    _assert_unchanged(opt, params, before)
    opt.close()


class Explosive(torch.optim.SGD):
    """torch's SGD that raises when its group says so and it holds a tensor of 7 elements
    (after updating, as a failure half-way through a step would)."""

    def __init__(self, params, lr=0.1, momentum=0.9, explode=False):
        super().__init__(params, lr=lr, momentum=momentum)
        self.defaults["explode"] = explode
        for group in self.param_groups:
            group.setdefault("explode", explode)

    def step(self, closure=None):
        loss = super().step(closure)
        if any(
            g["explode"] and any(p.numel() == 7 for p in g["params"]) for g in self.param_groups
        ):
            raise RuntimeError("boom on the shard holding the 7-element tensor")
        return loss


def _explosive_run(params, opt, explode_at=None, steps=5):
    """Steps, with the step at ``explode_at`` failing on shard 1 only."""
    errors = []
    for k in range(steps):
        opt.zero_grad()
        _backward(params, k)
        if k == explode_at:
            opt.param_groups[0]["explode"] = True
            with pytest.raises(Exception) as info:
                opt.step()
            errors.append(info.value)
            opt.param_groups[0]["explode"] = False
            continue
        opt.step()
    return errors


@pytest.mark.parametrize("where", ["ray", "gateway"])
def test_a_step_every_shard_refuses_raises_torchs_own_error(where):
    """``amsgrad`` turned on after the first step: torch's Adam raises KeyError (no
    ``max_exp_avg_sq`` in its state) before it updates anything, and so does every shard. No
    shard applied the step, so the shards agree: torch's own error is raised (it was a
    PartialStepError naming no shard that applied it), and with amsgrad off again the
    optimizer goes on as torch's."""
    from gateway_helpers import TOKEN

    from shardopt.gateway import serve

    gateway = serve("127.0.0.1", 0, tokens=[TOKEN]) if where == "gateway" else None
    remote = {"address": f"127.0.0.1:{gateway.port}", "token": TOKEN} if gateway else {}
    params, reference = _params(), _params()
    opt = shardopt.Adam(params, lr=0.1, foreach=False, num_shards=2, **remote)
    ref = torch.optim.Adam(reference, lr=0.1, foreach=False)
    try:
        for k in range(3):
            for ps, o in ((params, opt), (reference, ref)):
                o.zero_grad()
                _backward(ps, k)
                o.param_groups[0]["amsgrad"] = k == 1
                if k == 1:
                    with pytest.raises(KeyError, match="max_exp_avg_sq") as refused:
                        o.step()
                    continue
                o.step()
            if k == 1:
                assert type(refused.value) is KeyError
        assert_same_tensors(params, reference)
        assert_same_state_dict(opt.state_dict(), ref.state_dict())
    finally:
        opt.close()
        if gateway is not None:
            gateway.stop(1)


def test_a_step_failing_on_one_shard_names_who_applied_it():
    params = _params()
    opt = shardopt.ShardedOptimizer(params, Explosive, num_shards=2)
    assert opt.plan.owners == (0, 1, 1)
    saved = opt.state_dict()
    saved_values = [p.detach().clone() for p in params]
    (error,) = _explosive_run(params, opt, explode_at=0, steps=1)
    assert isinstance(error, shardopt.PartialStepError)
    assert (error.step_id, error.applied, error.failed) == (0, [0], [1])
    assert isinstance(error.__cause__, RuntimeError) and "boom" in str(error.__cause__)
    assert "load_state_dict" in str(error) and "shard(s) [0] applied it" in str(error)
    # the way back the message gives: the parameters and optimizer state saved before the step
    with torch.no_grad():
        for p, v in zip(params, saved_values):
            p.copy_(v)
    opt.load_state_dict(saved)
    reference = _params()
    ref = Explosive(reference)
    for k in range(1, 4):
        for ps, o in ((params, opt), (reference, ref)):
            o.zero_grad()
            _backward(ps, k)
            o.step()
        assert_same_tensors([p.detach() for p in params], [p.detach() for p in reference])
    opt.close()


def test_a_shard_lost_while_the_step_is_sent_names_the_shards_that_applied_it():
    """Each shard's step leaves as soon as its gradients are packed, so a shard that fails
    while the next ones are packed has applied the step already. Here shard 1 has no gradient
    but an in-place edit to receive (through Ray: no shared memory), and its host is dead:
    shard 0 applied the step, its parameters come back, and the error names it (as for a
    shard failing in its update)."""
    import ray

    params = _params()
    # hosts of their own (a separate pool entry), since this test kills one
    opt = shardopt.SGD(
        params,
        lr=0.5,
        num_shards=2,
        split=False,
        shared_memory=False,
        actor_options={"num_cpus": 0},
    )
    try:
        on_0 = [p for p, s in zip(params, opt.plan.owners) if s == 0]
        on_1 = [p for p, s in zip(params, opt.plan.owners) if s == 1]
        before = [p.detach().clone() for p in on_0]
        for p in on_0:
            p.grad = torch.ones_like(p)
        with torch.no_grad():
            on_1[0].add_(1.0)  # an edit, sent on its own since shard 1 has no gradient
        ray.kill(opt.backend.handles[1].host, no_restart=True)
        with pytest.raises(shardopt.PartialStepError) as info:
            opt.step()
        assert (info.value.step_id, info.value.applied, info.value.failed) == (0, [0], [1])
        assert_same_tensors([p.detach() for p in on_0], [b - 0.5 for b in before])
    finally:
        opt.close()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["lane", "ray"])
def test_a_shard_lost_while_the_others_step_names_the_shards_that_applied_it(shared_memory):
    """Both shards are sent the step; shard 1's host is dead, so its answer is an error while
    shard 0 applies it. Shard 0's parameters come back stepped and the error names it, with the
    loss as its cause, instead of a bare ShardUnavailableError that hides that one shard moved
    on (without replicas nothing rolls it back)."""
    import ray

    params = _params()
    opt = shardopt.SGD(  # hosts of their own (a separate pool entry), since this test kills one
        params, lr=0.5, num_shards=2, split=False, shared_memory=shared_memory,
        actor_options={"num_cpus": 0},
    )  # fmt: skip
    try:
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        host = opt.backend.handles[1].host
        pid = ray.get(host.info.remote())["pid"]
        ray.kill(host, no_restart=True)  # asynchronous: its lane answers until the process ends
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(shardopt.PartialStepError) as info:
            opt.step()
        assert (info.value.step_id, info.value.applied, info.value.failed) == (0, [0], [1])
        assert isinstance(info.value.__cause__, shardopt.ShardUnavailableError)
        owners = opt.plan.owners
        expected = [b - 0.5 if s == 0 else b for b, s in zip(before, owners)]
        assert_same_tensors([p.detach() for p in params], expected)
    finally:
        opt.close()


@pytest.mark.parametrize("replicate", [False, True], ids=["plain", "replicas"])
def test_a_step_interrupted_while_packing_leaves_no_answer_for_the_next_step(replicate):
    """Shard 0's step left through its lane before shard 1's gradients were packed, and the
    packing was interrupted: the step waits for shard 0's answer before it raises, so the
    next steps read their own answers, and shard 0 applied the interrupted step (its
    parameters came back), shard 1 did not (SGD, lr 0.5, gradients of ones: the parameters
    say how many steps each shard applied). Before that wait, the lane opened again for the
    next step sometimes dropped the request it found unread (CI saw 3 steps on shard 0).
    With replicas, shard 0's replica gets the step too, as after a complete step: a primary
    and its replica stay bit-identical (before, it missed the step for good, and a fail-over
    would have lost it)."""
    import ray

    params = _params()
    opt = shardopt.SGD(params, lr=0.5, num_shards=2, split=False, replicate=replicate)
    try:
        assert opt.uses_shared_memory == [True, True]
        owners = opt.plan.owners
        before = [p.detach().clone() for p in params]
        interrupt_a_step(opt, params, owners)
        for _ in range(3):
            opt.step()
        want = sgd_on_ones(before, [4 if s == 0 else 3 for s in owners])
        assert_same_tensors([p.detach() for p in params], want)
        opt.backend.pull_params()  # the shards' master copies say the same
        assert_same_tensors([p.detach() for p in params], want)
        if not replicate:
            return
        replicas, layouts = opt.backend.replicas, opt.backend.shard_map
        replicas.settle()
        for s, (primary, replica) in enumerate(zip(opt.backend.handles, replicas.handles)):
            assert replica is not None
            mine = [w for w, owner in zip(want, owners) if owner == s]
            for where, handle in (("primary", primary), ("replica", replica)):
                flat = torch.as_tensor(ray.get(handle.param_values()))  # (with its padding)
                got = [layouts.layout(s).view(flat, j) for j in range(len(mine))]
                assert_same_tensors(got, mine, path=f"shard {s}'s {where}")
            steps = [st.last_step_id for st in ray.get([primary.status(), replica.status()])]
            assert steps == [3, 3], s
    finally:
        opt.close()


@pytest.mark.parametrize(
    ("refresh", "shared_memory"),
    [
        pytest.param(1, True, id="every-step-shm"),
        pytest.param(2, False, id="every-2-object_store"),
    ],
)
def test_with_replicas_a_failed_step_is_rolled_back_everywhere(refresh, shared_memory):
    params, reference = _params(), _params()
    opt = shardopt.ShardedOptimizer(
        params, Explosive, num_shards=2, replicate=True, replica_refresh=refresh,
        shared_memory=shared_memory,
    )  # fmt: skip
    (error,) = _explosive_run(params, opt, explode_at=3)
    assert type(error) is RuntimeError and "boom" in str(error)
    assert any("rolled back" in note for note in getattr(error, "__notes__", []))
    ref = Explosive(reference)  # the same run without the failed step
    _explosive_run(reference, ref, explode_at=None, steps=3)
    for k in (4,):
        ref.zero_grad()
        _backward(reference, k)
        ref.step()
    assert_same_tensors([p.detach() for p in params], [p.detach() for p in reference])
    want = ref.state_dict()
    got = opt.state_dict()
    for group in want["param_groups"]:
        group["explode"] = False
    assert_same_state_dict(got, want)
    opt.close()
