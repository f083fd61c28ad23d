"""Tensors split across shards by rows: balance, parity with torch, state and checkpoints.

One big tensor (an embedding) is cut along dim 0 into row ranges on several shards. Every test
here compares against torch.optim on the same tensors, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same, assert_same_state_dict, assert_same_tensors
from torch import nn

import shardopt
from shardopt.core.plan import ALIGN

ELEMENT_WISE = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "Adam": dict(lr=1e-2, amsgrad=True, fused=False),  # torch's default path (fused below)
    "AdamW": dict(lr=1e-2, fused=False),
    "Adadelta": dict(lr=0.5),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
    "Adamax": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2, t0=1.0),
    "NAdam": dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.01),
    "RAdam": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True),
    "Rprop": dict(lr=1e-2),
}
SHAPES = [(200, 24), (24,), (8, 24), ()]
"""One dominant tensor, two small ones and a scalar: the big one must be cut to balance."""


def _params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _loss(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    return sum(
        ((p - torch.randn(p.shape, generator=gen)) ** 2 * (i + 1)).sum()
        for i, p in enumerate(params)
    )


def _run(opt, params, steps, start=0):
    trajectory = []
    for k in range(start, start + steps):
        opt.zero_grad()
        _loss(params, k).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def _assert_balanced(plan, tol=0.10):
    mean = sum(plan.shard_bytes) / plan.num_shards
    assert max(plan.shard_bytes) <= mean * (1 + tol), plan.describe()


def _cuts_aligned(plan, params):
    for pid, pieces in enumerate(plan.pieces):
        row_numel = params[pid][0].numel() if params[pid].dim() else 1
        for piece in pieces[1:]:
            assert piece.start * row_numel % ALIGN == 0, plan.describe()


# ----- parity for every element-wise algorithm ---------------------------------------------


@pytest.mark.parametrize("num_shards", [2, 3, 4])
@pytest.mark.parametrize("name", list(ELEMENT_WISE))
def test_split_parity_every_element_wise_algorithm(name, num_shards):
    cls = getattr(torch.optim, name)
    kwargs = ELEMENT_WISE[name]
    params, ref = _params(), _params()
    opt = getattr(shardopt, name)(params, num_shards=num_shards, **kwargs)
    try:
        assert opt.plan.is_split(0) and len(opt.plan.pieces[0]) == num_shards
        assert not any(opt.plan.is_split(pid) for pid in (1, 2, 3))
        _assert_balanced(opt.plan)
        _cuts_aligned(opt.plan, params)
        want_opt = cls(ref, **kwargs)
        got, want = _run(opt, params, 3), _run(want_opt, ref, 3)
        for k, (a, b) in enumerate(zip(got, want)):
            assert_same_tensors(a, b, path=f"step {k}")
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
        # optimizer.state[p] gives whole tensors, as torch's does
        for p, q in zip(params, ref):
            assert_same(dict(opt.state[p]), dict(want_opt.state[q]), "state[p]")
    finally:
        opt.close()


@pytest.mark.parametrize("fused", [None, True])
def test_split_parity_fused_adam_adamw_and_sgd(fused):
    """Adam and AdamW shards run torch's fused kernel unless told otherwise (fused=None): the
    same numbers as torch's ``fused=True``, split or not."""
    cases = [("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, amsgrad=True))]
    cases += [("SGD", dict(lr=0.05, momentum=0.9))] if fused else []
    for name, kwargs in cases:
        params, ref = _params(), _params()
        opt = getattr(shardopt, name)(params, num_shards=3, fused=fused, **kwargs)
        try:
            assert opt.plan.is_split(0)
            want_opt = getattr(torch.optim, name)(ref, fused=True, **kwargs)
            assert_same_tensors(_run(opt, params, 3)[-1], _run(want_opt, ref, 3)[-1])
            assert_same(opt.state_dict()["state"], want_opt.state_dict()["state"], "state")
        finally:
            opt.close()


# ----- what may be split, and how -----------------------------------------------------------


def test_fewer_rows_than_shards_one_row_and_zero_dim():
    # 3 rows on 4 shards (rows of 512 elements are cut units of their own); one row never cut
    shapes = [(3, 512), (1, 300), (), (5,)]
    params, ref = _params(shapes), _params(shapes)
    opt = shardopt.Adam(params, lr=1e-2, fused=True, num_shards=4)
    try:
        assert [len(p) for p in opt.plan.pieces] == [3, 1, 1, 1]
        assert len({p.shard for p in opt.plan.pieces[0]}) == 3
        want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
        assert_same_tensors(_run(opt, params, 3)[-1], _run(want_opt, ref, 3)[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()


def test_whole_matrix_algorithms_and_user_classes_keep_whole_tensors():
    class MyElementWise(torch.optim.SGD):
        pass

    for opt in (
        shardopt.ShardedOptimizer(_params(), torch.optim.Adafactor, lr=1e-2, num_shards=3),
        shardopt.ShardedOptimizer(_params(), MyElementWise, lr=1e-2, num_shards=3),
        shardopt.Adam(_params(), lr=1e-2, num_shards=3, split=False),
    ):
        try:
            assert not any(opt.plan.is_split(pid) for pid in range(len(SHAPES)))
        finally:
            opt.close()
    with pytest.raises(ValueError, match="Adafactor updates whole matrices"):
        shardopt.ShardedOptimizer(_params(), torch.optim.Adafactor, num_shards=3, split=True)
    with pytest.raises(ValueError, match="Invalid split"):
        shardopt.Adam(_params(), num_shards=3, split="yes")
    params, ref = _params(), _params()
    opt = shardopt.ShardedOptimizer(params, MyElementWise, lr=0.05, num_shards=3, split=True)
    try:
        assert opt.plan.is_split(0)
        want_opt = MyElementWise(ref, lr=0.05)
        assert_same_tensors(_run(opt, params, 2)[-1], _run(want_opt, ref, 2)[-1])
    finally:
        opt.close()


def test_groups_mixing_split_and_whole_and_add_param_group():
    params, ref = _params(), _params()
    extra, extra_ref = _params([(160, 24), (4,)], 1), _params([(160, 24), (4,)], 1)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "split": False}]

    opt = shardopt.AdamW(groups(params), lr=1e-2, fused=True, num_shards=3)
    want_opt = torch.optim.AdamW(
        [{"params": ref[:2]}, {"params": ref[2:], "lr": 0.02}], lr=1e-2, fused=True
    )
    try:
        assert opt.plan.is_split(0)
        assert (
            "split" not in opt.param_groups[1]
            and "split" not in opt.state_dict()["param_groups"][1]
        )
        got, want = _run(opt, params, 2), _run(want_opt, ref, 2)
        assert_same_tensors(got[-1], want[-1])
        opt.add_param_group({"params": extra, "lr": 0.03})
        want_opt.add_param_group({"params": extra_ref, "lr": 0.03})
        assert opt.plan.is_split(4)  # placed around the others, cut to balance
        got = _run(opt, params + extra, 2, start=2)
        want = _run(want_opt, ref + extra_ref, 2, start=2)
        assert_same_tensors(got[-1], want[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()
    split_whole = shardopt.AdamW(groups(_params()), lr=1e-2, num_shards=3)
    try:
        split_whole.add_param_group({"params": _params([(160, 24)], 2), "split": False})
        assert not split_whole.plan.is_split(4)
    finally:
        split_whole.close()


# ----- state_dict and checkpoints ------------------------------------------------------------


def test_state_dict_both_ways_and_any_shard_count():
    # torch -> split shardopt: continue identically
    params, ref = _params(), _params()
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    _run(want_opt, ref, 2)
    with torch.no_grad():
        for p, q in zip(params, ref):
            p.copy_(q)
    opt = shardopt.Adam(params, lr=1e-2, fused=True, num_shards=3)
    try:
        opt.load_state_dict(want_opt.state_dict())
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
        assert_same_tensors(_run(opt, params, 2, 2)[-1], _run(want_opt, ref, 2, 2)[-1])
        saved = opt.state_dict()
        assert_same_state_dict(saved, want_opt.state_dict())
        assert saved["state"][0]["exp_avg"].shape == (200, 24)  # whole tensors
    finally:
        opt.close()
    # split shardopt -> torch, and -> shardopt with another cut (4 shards) and with none (1)
    for make in (
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        lambda ps: shardopt.Adam(ps, lr=1e-2, fused=True, num_shards=4),
        lambda ps: shardopt.Adam(ps, lr=1e-2, fused=True, num_shards=1),
    ):
        again = [nn.Parameter(p.detach().clone()) for p in params]
        other = make(again)
        try:
            other.load_state_dict(saved)
            assert_same_tensors(_run(other, again, 2, 4)[-1], _run(want_opt, ref, 2, 4)[-1])
            ref_state = want_opt.state_dict()
            assert_same_state_dict(other.state_dict(), ref_state)
            # put the reference back where the others start from
            want_opt.load_state_dict(saved)
            with torch.no_grad():
                for q, p in zip(ref, params):
                    q.copy_(p)
        finally:
            if hasattr(other, "close"):
                other.close()


def test_rejected_state_dict_leaves_every_piece_as_it_was():
    params = _params()
    opt = shardopt.Adam(params, lr=1e-2, num_shards=3)
    try:
        _run(opt, params, 1)
        before = opt.state_dict()
        bad = opt.state_dict()
        bad["state"][0]["exp_avg"] = torch.zeros(199, 24)  # wrong shape for the split tensor
        with pytest.raises((ValueError, RuntimeError)):
            opt.load_state_dict(bad)
        assert_same_state_dict(opt.state_dict(), before)
    finally:
        opt.close()


def test_checkpoint_from_three_split_shards_into_two_and_plain_torch(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    params, ref = _params(), _params()
    opt = shardopt.RMSprop(params, lr=1e-2, momentum=0.5, num_shards=3)
    want_opt = torch.optim.RMSprop(ref, lr=1e-2, momentum=0.5)
    try:
        _run(opt, params, 2)
        _run(want_opt, ref, 2)
        cut = opt.plan.pieces[0]
        opt.save_checkpoint(tmp_path / "ckpt")
        # plain torch: whole tensors
        dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "whole.pt")
        whole = torch.load(tmp_path / "whole.pt", weights_only=True)
        flat = whole["state"]
        assert flat["0"]["square_avg"].shape == (200, 24)
        assert torch.equal(flat["0"]["square_avg"], want_opt.state_dict()["state"][0]["square_avg"])
    finally:
        opt.close()
    again = [nn.Parameter(p.detach().clone()) for p in params]
    two = shardopt.RMSprop(again, lr=1e-2, momentum=0.5, num_shards=2)
    try:
        assert two.plan.is_split(0) and two.plan.pieces[0] != cut  # cut differently
        two.load_checkpoint(tmp_path / "ckpt")
        assert_same_state_dict(two.state_dict(), want_opt.state_dict())
        assert_same_tensors(_run(two, again, 2, 2)[-1], _run(want_opt, ref, 2, 2)[-1])
    finally:
        two.close()


# ----- sparse embeddings --------------------------------------------------------------------


def _embedding_run(opt_factory, num_shards, steps=4, tol=0.0, state=True, **kw):
    torch.manual_seed(0)
    model = nn.Embedding(1000, 16, sparse=True)
    ref = nn.Embedding(1000, 16, sparse=True)
    ref.load_state_dict(model.state_dict())
    opt = opt_factory(list(model.parameters()), num_shards=num_shards, **kw)
    want_opt = opt_factory(list(ref.parameters()))
    gen = torch.Generator().manual_seed(3)
    try:
        for _ in range(steps):
            ids = torch.randint(0, 300, (20,), generator=gen)  # rows of the first pieces only
            for m, o in ((model, opt), (ref, want_opt)):
                o.zero_grad()
                (m(ids) ** 2).sum().backward()
                o.step()
            assert_same_tensors(list(model.parameters()), list(ref.parameters()), tol)
        if state:
            assert_same_state_dict(opt.state_dict(), want_opt.state_dict(), tol)
        return opt
    except BaseException:
        opt.close()
        raise


SPARSE = {
    "SparseAdam": lambda ps, num_shards=None, **kw: (
        shardopt.SparseAdam(ps, lr=1e-2, num_shards=num_shards, **kw)
        if num_shards
        else torch.optim.SparseAdam(ps, lr=1e-2)
    ),
    "Adagrad": lambda ps, num_shards=None, **kw: (
        shardopt.Adagrad(ps, lr=0.1, num_shards=num_shards, **kw)
        if num_shards
        else torch.optim.Adagrad(ps, lr=0.1)
    ),
}
SGD_MOMENTUM = lambda ps, num_shards=None, **kw: (  # noqa: E731
    shardopt.SGD(ps, lr=0.1, momentum=0.9, num_shards=num_shards, **kw)
    if num_shards
    else torch.optim.SGD(ps, lr=0.1, momentum=0.9)
)


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "object_store"])
@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_embedding_rows_split_by_range(name, shared_memory):
    opt = _embedding_run(SPARSE[name], 3, shared_memory=shared_memory)
    try:
        assert len(opt.plan.pieces[0]) == 3
    finally:
        opt.close()


def test_sparse_step_sends_and_returns_only_touched_rows_of_each_range(monkeypatch):
    """Records what really crosses to each shard (the real calls still run)."""
    torch.manual_seed(0)
    model = nn.Embedding(900, 16, sparse=True)
    opt = shardopt.SparseAdam(list(model.parameters()), lr=1e-2, num_shards=3, shared_memory=False)
    sent, returned = {}, {}
    handle_type = type(opt.backend.handles[0])
    original = handle_type.step

    def spy(handle, request):
        shard = opt.backend.handles.index(handle)
        sent[shard] = request
        returned[shard] = original(handle, request)
        return returned[shard]

    monkeypatch.setattr(handle_type, "step", spy)
    try:
        pieces = opt.plan.pieces[0]
        ids = torch.tensor([1, 2, 2, 5, pieces[1].start + 3, pieces[1].stop - 1])
        opt.zero_grad()
        model(ids).sum().backward()
        opt.step()
        for piece in pieces:
            request = sent[piece.shard]
            (grad,) = request.sparse_grads.values()
            rows = sorted({int(i) - piece.start for i in ids if piece.start <= i < piece.stop})
            assert grad.indices[0].tolist() == rows  # only its rows, counted from its start
            assert grad.values.shape == (len(rows), 16)
            assert request.grads is None or not any(request.has_grad)
            result = shardopt.client.runtime.ray_get(returned[piece.shard])
            assert result.params is None and result.rows_only
            assert result.rows[0].shape == (len(rows), 16)
    finally:
        opt.close()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "object_store"])
def test_sparse_sgd_with_momentum_returns_every_row_it_changed(shared_memory):
    """Momentum moves rows touched in earlier steps too, so the whole piece comes back. (torch's
    SGD sums a sparse gradient's repeated rows one by one, shardopt coalesces them first: equal
    to rounding. Its sparse momentum buffers cannot go into a state_dict yet.)"""
    opt = _embedding_run(SGD_MOMENTUM, 2, tol=1e-6, state=False, shared_memory=shared_memory)
    opt.close()


# ----- data paths, replicas and groups with pieces --------------------------------------------

DATA_PATHS = {
    "object_store": dict(shared_memory=False),
    "shm-overlap": dict(shared_memory=True, overlap=True),
    "share_params": dict(shared_memory=True, share_params=True),
    "object_store-overlap": dict(shared_memory=False, overlap=True),
}


@pytest.mark.parametrize("data_path", list(DATA_PATHS))
def test_split_with_every_data_path(data_path):
    params, ref = _params(), _params()
    opt = shardopt.Adam(params, lr=1e-2, fused=True, num_shards=3, **DATA_PATHS[data_path])
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    try:
        assert opt.plan.is_split(0)
        got, want = _run(opt, params, 2), _run(want_opt, ref, 2)
        assert_same_tensors(got[-1], want[-1])
        with torch.no_grad():  # a write the next step must carry to every piece
            params[0][150:].mul_(0.5)
            ref[0][150:].mul_(0.5)
        got, want = _run(opt, params, 2, 2), _run(want_opt, ref, 2, 2)
        assert_same_tensors(got[-1], want[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()


def test_split_with_replicas_survives_a_lost_piece():
    from shardopt.testing import kill

    params, ref = _params(), _params()
    opt = shardopt.Adam(params, lr=1e-2, fused=True, num_shards=3, replicate=True)
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    try:
        assert opt.plan.is_split(0)
        _run(opt, params, 2)
        _run(want_opt, ref, 2)
        kill(opt.backend.handles[opt.plan.pieces[0][1].shard].host)
        got, want = _run(opt, params, 2, 2), _run(want_opt, ref, 2, 2)
        assert_same_tensors(got[-1], want[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()


def test_split_in_a_shard_group():
    params, ref = _params(), _params()
    opt = shardopt.Adam(
        params, lr=1e-2, fused=True, num_shards=3, group="split-test", world_size=1, rank=0
    )
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    try:
        assert opt.plan.is_split(0)
        got, want = _run(opt, params, 3), _run(want_opt, ref, 3)
        assert_same_tensors(got[-1], want[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()


@pytest.mark.parametrize("where", ["plain", "replicas", "group"])
def test_dropping_one_tensors_state_asks_only_its_shards(where):
    """``del opt.state[p]`` and ``pop`` drop the state of ``p`` on the shards holding its pieces
    alone (they reloaded every shard's whole state for each deletion: seconds for a large
    model). Torch's numbers and order follow: ``p`` starts afresh at its next step and comes
    last in the state dict. With replicas, the replica drops it too: the primary holding a
    piece of the dropped tensor is lost after the deletion, and the replica that takes over
    has no state left for it."""
    from shardopt.testing import kill

    params, ref = _params(), _params()
    options = {
        "plain": {},
        "replicas": {"replicate": True},
        "group": {"group": f"drop-state-{where}", "world_size": 1, "rank": 0},
    }[where]
    opt = shardopt.Adam(params, lr=1e-2, fused=True, num_shards=3, **options)
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    try:
        assert opt.plan.is_split(0)
        _run(opt, params, 2)
        _run(want_opt, ref, 2)
        for o, ps in ((opt, params), (want_opt, ref)):
            del o.state[ps[0]]  # the split tensor: a piece on every shard
            assert set(o.state.pop(ps[2])) == {"step", "exp_avg", "exp_avg_sq"}
        assert list(opt.state) == [params[1], params[3]]
        with pytest.raises(KeyError):
            del opt.state[params[0]]
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
        if where == "replicas":
            kill(opt.backend.handles[opt.plan.pieces[0][1].shard].host)
        got, want = _run(opt, params, 2, 2), _run(want_opt, ref, 2, 2)
        assert_same_tensors(got[-1], want[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
        assert list(opt.state_dict()["state"]) == [1, 3, 0, 2]
    finally:
        opt.close()


# ----- the balance the issue asked for ---------------------------------------------------------


def _sizes(shapes, split=True):
    from shardopt.core.plan import TensorSize

    return [
        TensorSize(4 * math.prod(s), s[0] if s else 1, split, math.prod(s[1:]) if s else 1)
        for s in shapes
    ]


GPT2 = [(50257, 768), (1024, 768)] + [
    (768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
    (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,),
] * 12 + [(768,), (768,)]  # fmt: skip


@pytest.mark.parametrize(
    "shapes,num_shards",
    [([(32000, 64)] + [(64, 64)] * 4, 4), (GPT2, 8), (GPT2, 16)],
    ids=["embedding-4", "gpt2-8", "gpt2-16"],
)
def test_every_shard_within_ten_percent_of_the_mean(shapes, num_shards):
    from shardopt.core.plan import ShardPlan

    whole = ShardPlan.empty(num_shards).extended(_sizes(shapes, split=False))
    split = ShardPlan.empty(num_shards).extended(_sizes(shapes))
    mean = sum(split.shard_bytes) / num_shards
    assert max(whole.shard_bytes) > 2.4 * mean  # the figures: 3.97x, 2.48x, 4.96x
    assert max(split.shard_bytes) <= 1.10 * mean
    assert min(split.shard_bytes) >= 0.90 * mean
    for pieces in split.pieces:  # a shard holds at most one piece of a tensor
        assert len({p.shard for p in pieces}) == len(pieces)
        assert pieces[0].start == 0 and all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))


def test_assigning_optimizer_state_of_a_split_parameter():
    params, ref = _params(), _params()
    opt = shardopt.Adam(params, lr=1e-2, fused=True, num_shards=3)
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    try:
        assert opt.plan.is_split(0)
        _run(opt, params, 1)
        _run(want_opt, ref, 1)
        for o, p in ((opt, params[0]), (want_opt, ref[0])):
            state = dict(o.state[p])
            state["exp_avg"] = state["exp_avg"] * 0.5 + 1.0
            o.state[p] = state
        assert_same(dict(opt.state[params[0]]), dict(want_opt.state[ref[0]]), "state[p]")
        assert_same_tensors(_run(opt, params, 2, 1)[-1], _run(want_opt, ref, 2, 1)[-1])
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()


@pytest.mark.parametrize("overlap", [False, True], ids=["", "overlap"])
@pytest.mark.parametrize("clip", [False, True], ids=["scaled", "unscale_-clip"])
def test_grad_scaler_and_scheduler_with_split_tensors(clip, overlap):
    """GradScaler's loop (an inf step skipped on every piece) and an lr scheduler, split."""
    from test_dropin import INF_STEP, _scaled_run

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 400), nn.Tanh(), nn.Linear(400, 2))

    sharded_model, torch_model = model(), model()
    opt = shardopt.AdamW(sharded_model.parameters(), lr=1e-2, num_shards=3, overlap=overlap)
    ref = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, fused=True)
    try:
        assert opt.plan.is_split(0)
        for o in (opt, ref):
            o.step = _with_scheduler(o)
        got, want = _scaled_run(opt, sharded_model, clip), _scaled_run(ref, torch_model, clip)
        assert want[INF_STEP][1] == want[INF_STEP - 1][1] / 2  # the reference skipped a step
        for k, ((params, scale), (ref_params, ref_scale)) in enumerate(zip(got, want)):
            assert scale == ref_scale, k
            assert_same_tensors(params, ref_params, path=f"step {k}")
        assert_same(opt.state_dict()["state"], ref.state_dict()["state"], "state")
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] != 1e-2
    finally:
        opt.close()


def _with_scheduler(opt):
    """``opt.step`` followed by a StepLR step, as a training loop does."""
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    step = opt.step

    def stepped(*args, **kwargs):
        result = step(*args, **kwargs)
        scheduler.step()
        return result

    return stepped
