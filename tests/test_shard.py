"""Unit tests of shardopt.actor.shard, driving the plain ``Shard`` class in-process (no Ray).

Each test builds the records the proxy would send (a ``ShardSpec``, ``StepRequest``s, ...) and
checks the shard against a plain ``torch.optim`` optimizer run step by step over the same tensors.
Both sides run torch's own kernels on the same values, so results must be bitwise equal.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_same_tensors

from shardopt.actor.host import ShardHost
from shardopt.actor.shard import Shard
from shardopt.core.buffers import FlatLayout, pack_tree, readonly_tensor, to_numpy, unpack_tree
from shardopt.core.param_groups import fuses_by_default
from shardopt.core.records import (
    ParamBlock,
    ParamUpdate,
    ShardSpec,
    ShardStatus,
    SparseGrad,
    StateNews,
    StepRequest,
    StepResult,
)

# ----- helpers ------------------------------------------------------------------------------


def make_block(tensors: list[torch.Tensor], ids: list[int], groups: list[int]) -> ParamBlock:
    layout = FlatLayout.for_tensors(tensors)
    return ParamBlock(tuple(ids), tuple(groups), layout, to_numpy(layout.pack(tensors)))


def group_options(optimizer: torch.optim.Optimizer) -> tuple[dict, ...]:
    """Every group's hyperparameters, as the proxy sends them."""
    return tuple({k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups)


def values(layout: FlatLayout, array) -> list[torch.Tensor]:
    """Copies of the tensors in a flat numpy buffer a shard handed back."""
    flat = readonly_tensor(array)
    return [layout.view(flat, i).clone() for i in range(len(layout))]


class Twin:
    """A shard and a plain torch optimizer over copies of the same tensors, stepped together.

    Args:
        optimizer_class: the torch optimizer both run.
        tensors: initial parameter values, in the shard's local order.
        group_of: the param group index of each tensor.
        group_opts: each group's options (the rest come from ``defaults``).
        ids: global ids of the tensors (default: 10, 11, ...).
    """

    def __init__(self, optimizer_class, tensors, group_of, group_opts, ids=None, **defaults):
        self.ids = list(ids) if ids is not None else [10 + i for i in range(len(tensors))]
        self.params = [t.clone() for t in tensors]
        groups = [
            {**opts, "params": [p for p, g in zip(self.params, group_of) if g == k]}
            for k, opts in enumerate(group_opts)
        ]
        self.reference = optimizer_class(groups, **defaults)
        # the shard runs Adam/AdamW fused unless told otherwise: so does its twin
        self.auto_fused = [
            fuses_by_default(optimizer_class, g) for g in self.reference.param_groups
        ]
        for group, fused in zip(self.reference.param_groups, self.auto_fused):
            if fused:
                group["fused"] = True
        block = make_block(tensors, self.ids, list(group_of))
        self.layout = block.layout
        spec = ShardSpec(optimizer_class, dict(defaults), tuple(group_opts), block)
        self.shard = Shard(0, spec)
        self.next_step_id = 0

    def request(self, grads, step_id=None, sparse=None, params_in=None) -> StepRequest:
        """The step request for ``grads`` (None = no gradient) by local index."""
        if step_id is None:
            step_id = self.next_step_id
        options = tuple(
            {**opts, "fused": None} if fused else opts
            for opts, fused in zip(group_options(self.reference), self.auto_fused)
        )
        return StepRequest(
            step_id=step_id,
            group_options=options,
            grads=to_numpy(self.layout.pack(list(grads))),
            has_grad=tuple(g is not None for g in grads),
            sparse_grads=dict(sparse or {}),
            params_in=params_in,
        )

    def step(self, grads, sparse_torch=None, sparse=None) -> StepResult:
        """One step on both, with the same gradients."""
        for i, p in enumerate(self.params):
            p.grad = None if grads[i] is None else grads[i].clone()
        for i, g in (sparse_torch or {}).items():
            self.params[i].grad = g
        self.reference.step()
        result = self.shard.step(self.request(grads, sparse=sparse))
        assert result.step_id == self.next_step_id
        self.next_step_id += 1
        return result

    def shard_params(self) -> list[torch.Tensor]:
        return values(self.layout, self.shard.param_values())

    def torch_state(self) -> dict:
        """The torch optimizer's state keyed by the shard's global ids."""
        by_tensor = {id(p): pid for p, pid in zip(self.params, self.ids)}
        return {by_tensor[id(p)]: s for p, s in self.reference.state.items()}

    def assert_in_sync(self) -> None:
        assert_same_tensors(self.shard_params(), self.params)
        shard_state = unpack_tree(self.shard.state())
        torch_state = self.torch_state()
        assert sorted(shard_state) == sorted(torch_state)
        for pid, state in torch_state.items():
            torch.testing.assert_close(shard_state[pid], dict(state), rtol=0, atol=0)


def adam_twin(**defaults) -> Twin:
    torch.manual_seed(1)
    tensors = [
        torch.randn(4, 3),
        torch.randn(5, dtype=torch.float64),
        torch.randn(()),
        torch.randn(2, 2),
    ]
    return Twin(
        torch.optim.Adam,
        tensors,
        group_of=[0, 1, 0, 1],
        group_opts=[{"lr": 0.05}, {"lr": 0.01, "weight_decay": 0.1}],
        ids=[7, 3, 12, 5],
        **defaults,
    )


def random_grads(twin: Twin, skip: tuple[int, ...] = ()) -> list[torch.Tensor | None]:
    return [
        None if i in skip else torch.randn(p.shape, dtype=p.dtype)
        for i, p in enumerate(twin.params)
    ]


# ----- construction -------------------------------------------------------------------------


def test_shard_builds_a_real_optimizer_over_its_groups():
    twin = adam_twin(betas=(0.8, 0.99))
    opt = twin.shard.optimizer
    assert type(opt) is torch.optim.Adam
    assert len(opt.param_groups) == 2
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.01]
    assert opt.param_groups[1]["weight_decay"] == 0.1
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert_same_tensors(twin.shard_params(), twin.params)
    assert twin.shard.initial_state_ids() == ()
    for p in opt.param_groups[0]["params"]:
        assert p.is_leaf and p.device.type == "cpu"


def test_status_reports_params_state_and_last_step():
    twin = adam_twin()
    status = twin.shard.status()
    assert status == ShardStatus(
        shard_index=0,
        device="cpu",
        fused=True,
        num_params=4,
        param_bytes=twin.layout.nbytes,
        state_ids=(),
        last_step_id=-1,
    )
    twin.step(random_grads(twin, skip=(1,)))
    status = twin.shard.status()
    assert sorted(status.state_ids) == [5, 7, 12]
    assert status.last_step_id == 0


def test_shard_with_no_parameters():
    block = make_block([], [], [])
    shard = Shard(2, ShardSpec(torch.optim.Adam, {"lr": 0.1}, ({"lr": 0.1},), block))
    assert shard.status().num_params == 0
    assert shard.param_values().size == 0
    assert unpack_tree(shard.state()) == {}
    empty = FlatLayout.for_specs([])
    request = StepRequest(0, ({"lr": 0.1},), to_numpy(empty.empty()), (), {})
    assert shard.step(request).new_state_ids == ()


def test_shard_holding_only_zero_element_params():
    # The plan puts a zero-byte parameter on the least-loaded shard, possibly alone. Its
    # ParamBlock then has a 0-byte values buffer, which the shard must still accept.
    tensors = [torch.empty(0), torch.empty(2, 0)]
    shard = Shard(
        1, ShardSpec(torch.optim.Adam, {}, ({"lr": 0.1},), make_block(tensors, [4, 5], [0, 0]))
    )
    assert shard.status().num_params == 2


# ----- stepping -----------------------------------------------------------------------------


def test_steps_match_torch_adam_step_by_step():
    twin = adam_twin()
    for step in range(5):
        result = twin.step(random_grads(twin))
        assert result.step_id == step
        assert_same_tensors(values(twin.layout, result.params), twin.params)
        twin.assert_in_sync()


@pytest.mark.parametrize(
    "defaults",
    [{"amsgrad": True}, {"maximize": True}, {"betas": (0.5, 0.9), "eps": 1e-3}],
    ids=["amsgrad", "maximize", "betas"],
)
def test_adam_options_match_torch(defaults):
    twin = adam_twin(**defaults)
    for _ in range(3):
        twin.step(random_grads(twin))
    twin.assert_in_sync()


def test_first_step_reports_who_gained_state():
    twin = adam_twin()
    first = twin.step(random_grads(twin, skip=(0, 3)))
    assert first.new_state_ids == (3, 12)  # global ids, sorted
    second = twin.step(random_grads(twin, skip=(3,)))
    assert second.new_state_ids == (7,)
    third = twin.step(random_grads(twin))
    assert third.new_state_ids == (5,)
    assert twin.step(random_grads(twin)).new_state_ids == ()


def test_state_ledger_tells_a_reader_what_changed_since_it_last_heard():
    """A group's workers each follow the one state: the ids gained since their mark, or the
    whole list in the shard's order once state was dropped or replaced (or they know none)."""
    twin = adam_twin()
    shard, news = twin.shard, twin.shard.state_ledger.news
    nothing = news(None)
    assert (nothing.ids, nothing.whole) == ((), True)
    twin.step(random_grads(twin, skip=(0, 3)))  # 3 and 12 gain state
    seen = news(nothing.mark)
    assert (seen.ids, seen.whole, seen.mark[1]) == ((3, 12), False, 2)
    assert news(seen.mark).ids == ()  # nothing new
    twin.step(random_grads(twin, skip=(3,)))  # 7 gains state
    assert news(seen.mark).ids == (7,)
    assert news(None).ids == (12, 3, 7)  # a new reader: all, in the shard's (torch's) order
    shard.clear_param_state(12)  # a deletion: the whole list, for any reader
    after = news(seen.mark)
    assert (after.ids, after.whole) == ((3, 7), True)
    shard.restore(shard.export())  # a load (here of the same state): whole again
    assert news(after.mark) == StateNews(news(None).mark, (3, 7), True)


def test_slots_without_grad_are_skipped_like_grad_none():
    twin = adam_twin()
    before = twin.shard_params()
    twin.step(random_grads(twin, skip=(1, 2)))
    after = twin.shard_params()
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[0], before[0])
    assert sorted(unpack_tree(twin.shard.state())) == [5, 7]
    twin.assert_in_sync()

    # Garbage bytes in a has_grad=False slot are ignored.
    grads = random_grads(twin)
    request = twin.request(grads)
    poisoned = StepRequest(
        step_id=request.step_id,
        group_options=request.group_options,
        grads=request.grads,
        has_grad=(True, False, True, True),
        sparse_grads={},
    )
    grads[1] = None
    for p, g in zip(twin.params, grads):
        p.grad = g
    twin.reference.step()
    twin.shard.step(poisoned)
    twin.next_step_id += 1
    twin.assert_in_sync()


def test_grads_are_cleared_after_a_step():
    twin = adam_twin()
    twin.step(random_grads(twin))
    for group in twin.shard.optimizer.param_groups:
        assert all(p.grad is None for p in group["params"])


def test_group_options_of_each_request_apply():
    twin = adam_twin()
    twin.step(random_grads(twin))
    twin.reference.param_groups[0]["lr"] = 0.5  # a scheduler on the client
    twin.reference.param_groups[1]["betas"] = (0.7, 0.95)
    twin.step(random_grads(twin))
    assert twin.shard.optimizer.param_groups[0]["lr"] == 0.5
    assert twin.shard.optimizer.param_groups[1]["betas"] == (0.7, 0.95)
    twin.assert_in_sync()


def test_a_repeated_step_id_returns_the_same_result_without_applying_twice():
    twin = adam_twin()
    twin.step(random_grads(twin))
    grads = random_grads(twin)
    result = twin.step(grads)
    params_after = twin.shard_params()
    state_after = unpack_tree(twin.shard.state())

    again = twin.shard.step(twin.request(random_grads(twin), step_id=result.step_id))
    assert again is result
    assert again.step_id == 1
    assert_same_tensors(twin.shard_params(), params_after)
    torch.testing.assert_close(unpack_tree(twin.shard.state()), state_after, rtol=0, atol=0)
    assert twin.shard.status().last_step_id == 1

    # Stepping continues as if the retry never came.
    twin.step(random_grads(twin))
    twin.assert_in_sync()


def test_an_older_step_id_is_rejected():
    twin = adam_twin()
    twin.step(random_grads(twin))
    twin.step(random_grads(twin))
    before = twin.shard_params()
    with pytest.raises(ValueError, match="step 0 is older than the last applied step 1"):
        twin.shard.step(twin.request(random_grads(twin), step_id=0))
    assert_same_tensors(twin.shard_params(), before)
    twin.assert_in_sync()


def test_step_ids_may_skip():
    # The proxy sends no request to a shard none of whose parameters has a gradient.
    twin = adam_twin()
    twin.step(random_grads(twin))
    twin.next_step_id = 5
    assert twin.step(random_grads(twin)).step_id == 5
    twin.assert_in_sync()


# ----- parameters the user set ---------------------------------------------------------------


def param_update(indices: list[int], tensors: list[torch.Tensor]) -> ParamUpdate:
    layout = FlatLayout.for_tensors(tensors)
    return ParamUpdate(tuple(indices), layout, to_numpy(layout.pack(tensors)))


def test_set_params_overwrites_master_values():
    twin = adam_twin()
    twin.step(random_grads(twin))
    new = [torch.full((5,), 2.0, dtype=torch.float64), torch.tensor(-1.0)]
    twin.shard.set_params(param_update([1, 2], new))
    params = twin.shard_params()
    assert torch.equal(params[1], new[0]) and torch.equal(params[2], new[1])

    with torch.no_grad():
        twin.params[1].copy_(new[0])
        twin.params[2].copy_(new[1])
    twin.assert_in_sync()
    twin.step(random_grads(twin))
    twin.assert_in_sync()


def test_params_in_are_adopted_before_the_update():
    twin = adam_twin()
    twin.step(random_grads(twin))
    new = torch.arange(12.0).reshape(4, 3)
    with torch.no_grad():
        twin.params[0].copy_(new)
    grads = random_grads(twin)
    for p, g in zip(twin.params, grads):
        p.grad = g
    twin.reference.step()
    result = twin.shard.step(twin.request(grads, params_in=param_update([0], [new])))
    twin.next_step_id += 1
    assert result.step_id == 1
    twin.assert_in_sync()


# ----- param groups -------------------------------------------------------------------------


def test_add_param_group_keeps_existing_tensors_and_state():
    twin = adam_twin()
    for _ in range(2):
        twin.step(random_grads(twin))
    opt = twin.shard.optimizer
    old_tensors = [p for g in opt.param_groups for p in g["params"]]
    old_state = {id(p): s for p, s in opt.state.items()}

    extra = [torch.randn(3, 3), torch.randn(6)]
    twin.shard.add_param_group({"lr": 0.2}, make_block(extra, [20, 21], [2, 2]))
    new_tensors = [p for g in opt.param_groups for p in g["params"]]
    assert new_tensors[:4] == old_tensors and all(a is b for a, b in zip(new_tensors, old_tensors))
    assert {id(p): s for p, s in opt.state.items()} == old_state
    assert opt.param_groups[2]["lr"] == 0.2
    assert twin.shard.status().num_params == 6

    # The reference adds the same group; the layout grows as the proxy grows its copy.
    extra_params = [t.clone() for t in extra]
    twin.reference.add_param_group({"params": extra_params, "lr": 0.2, "fused": True})
    twin.auto_fused.append(True)
    twin.params += extra_params
    twin.ids += [20, 21]
    twin.layout = twin.layout.extended([(tuple(t.shape), t.dtype) for t in extra])
    assert twin.shard.status().param_bytes == twin.layout.nbytes
    twin.assert_in_sync()

    result = twin.step(random_grads(twin))
    assert result.new_state_ids == (20, 21)
    twin.step(random_grads(twin))
    twin.assert_in_sync()


def test_add_param_group_with_none_of_its_params_here():
    twin = adam_twin()
    twin.step(random_grads(twin))
    twin.shard.add_param_group({"lr": 0.3}, make_block([], [], []))
    assert len(twin.shard.optimizer.param_groups) == 3
    assert twin.shard.optimizer.param_groups[2]["params"] == []
    twin.reference.add_param_group({"params": [], "lr": 0.3, "fused": True})
    twin.auto_fused.append(True)
    twin.step(random_grads(twin))
    twin.assert_in_sync()


# ----- state --------------------------------------------------------------------------------


def test_state_is_keyed_by_global_id():
    twin = adam_twin()
    twin.step(random_grads(twin, skip=(2,)))
    state = unpack_tree(twin.shard.state())
    assert sorted(state) == [3, 5, 7]
    assert set(state[7]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state[3]["exp_avg"].dtype == torch.float64 and state[3]["exp_avg"].shape == (5,)

    subset = unpack_tree(twin.shard.state((5, 12, 99)))
    assert list(subset) == [5]  # ids without state (12) or not held here (99) are left out
    torch.testing.assert_close(subset[5], state[5], rtol=0, atol=0)

    # The packed state is a snapshot: stepping on does not change it.
    packed = twin.shard.state()
    twin.step(random_grads(twin))
    torch.testing.assert_close(unpack_tree(packed)[7], state[7], rtol=0, atol=0)


def test_set_param_state_replaces_one_params_state():
    twin = adam_twin()
    twin.step(random_grads(twin))
    new = {
        "step": torch.tensor(7.0),
        "exp_avg": torch.ones(4, 3),
        "exp_avg_sq": torch.full((4, 3), 4.0),
    }
    twin.shard.set_param_state(7, pack_tree(new))
    torch.testing.assert_close(unpack_tree(twin.shard.state((7,)))[7], new, rtol=0, atol=0)

    twin.reference.state[twin.params[0]] = {k: v.clone() for k, v in new.items()}
    twin.step(random_grads(twin))
    twin.assert_in_sync()


def test_adagrad_gives_state_in_its_constructor():
    torch.manual_seed(2)
    tensors = [torch.randn(3), torch.randn(2, 2)]
    twin = Twin(torch.optim.Adagrad, tensors, [0, 0], [{"lr": 0.1}], ids=[4, 1])
    assert twin.shard.initial_state_ids() == (1, 4)
    assert twin.shard.initial_state_ids() == ()  # reported once
    twin.assert_in_sync()
    result = twin.step(random_grads(twin))
    assert result.new_state_ids == ()
    twin.assert_in_sync()


# ----- all-or-nothing loads -----------------------------------------------------------------


def loaded_state(twin: Twin, scale: float) -> dict:
    """A plausible state for every parameter of ``twin`` (as another run would have left it)."""
    return {
        pid: {
            "step": torch.tensor(3.0),
            "exp_avg": torch.full(p.shape, scale, dtype=p.dtype),
            "exp_avg_sq": torch.full(p.shape, scale * scale, dtype=p.dtype),
        }
        for pid, p in zip(twin.ids, twin.params)
    }


def test_a_good_load_applies_only_on_commit():
    twin = adam_twin()
    twin.step(random_grads(twin))
    before = unpack_tree(twin.shard.state())
    state = loaded_state(twin, 0.5)
    options = tuple({**o, "lr": o["lr"] * 2} for o in group_options(twin.reference))

    assert twin.shard.prepare_load("tok", options, pack_tree(state)) is None
    torch.testing.assert_close(unpack_tree(twin.shard.state()), before, rtol=0, atol=0)
    assert [g["lr"] for g in twin.shard.optimizer.param_groups] == [0.05, 0.01]

    twin.shard.commit_load("tok")
    torch.testing.assert_close(unpack_tree(twin.shard.state()), state, rtol=0, atol=0)
    assert [g["lr"] for g in twin.shard.optimizer.param_groups] == [0.1, 0.02]
    # The shard's tensors stay the optimizer's parameters (same identities, same values).
    assert_same_tensors(twin.shard_params(), twin.params)

    # The torch twin is given the same state and options; both then step identically.
    for p, pid in zip(twin.params, twin.ids):
        twin.reference.state[p] = {k: v.clone() for k, v in state[pid].items()}
    for group, opts in zip(twin.reference.param_groups, options):
        group.update(opts)
    twin.assert_in_sync()
    for _ in range(2):
        assert twin.step(random_grads(twin)).new_state_ids == ()
    twin.assert_in_sync()


def test_load_into_a_shard_without_state_reports_new_ids_only_after():
    twin = adam_twin()
    state = {7: loaded_state(twin, 1.0)[7]}
    assert twin.shard.prepare_load("t", group_options(twin.reference), pack_tree(state)) is None
    twin.shard.commit_load("t")
    assert sorted(unpack_tree(twin.shard.state())) == [7]
    request = twin.request(random_grads(twin))
    assert twin.shard.step(request).new_state_ids == (3, 5, 12)


def bad_states(twin: Twin) -> dict[str, tuple[tuple[dict, ...], dict]]:
    options = group_options(twin.reference)
    wrong_shape = loaded_state(twin, 1.0)
    wrong_shape[5]["exp_avg"] = torch.zeros(3, 3)
    unknown_id = loaded_state(twin, 1.0)
    unknown_id[99] = unknown_id.pop(12)
    return {
        "wrong shape": (options, wrong_shape),
        "unknown id": (options, unknown_id),
        "too few groups": (options[:1], loaded_state(twin, 1.0)),
    }


@pytest.mark.parametrize("case", ["wrong shape", "unknown id", "too few groups"])
def test_a_bad_load_is_reported_and_changes_nothing(case):
    twin, untouched = adam_twin(), adam_twin()
    for _ in range(2):
        grads = random_grads(twin)
        twin.step(grads)
        untouched.step(grads)
    options, state = bad_states(twin)[case]
    opt = twin.shard.optimizer
    state_obj, groups_obj = opt.state, opt.param_groups

    error = twin.shard.prepare_load("bad", options, pack_tree(state))
    assert isinstance(error, ValueError)
    assert opt.state is state_obj and opt.param_groups is groups_obj
    twin.shard.abort_load("bad")
    with pytest.raises(KeyError):
        twin.shard.commit_load("bad")  # nothing was staged

    for _ in range(3):
        grads = random_grads(twin)
        twin.step(grads)
        untouched.step(grads)
    assert_same_tensors(twin.shard_params(), untouched.shard_params())
    torch.testing.assert_close(
        unpack_tree(twin.shard.state()), unpack_tree(untouched.shard.state()), rtol=0, atol=0
    )
    twin.assert_in_sync()


def test_wrong_shape_error_names_the_param():
    twin = adam_twin()
    twin.step(random_grads(twin))
    options, state = bad_states(twin)["wrong shape"]
    error = twin.shard.prepare_load("bad", options, pack_tree(state))
    assert "'exp_avg'" in str(error) and "parameter id 5" in str(error)
    assert "(3, 3)" in str(error) and "(2, 2)" in str(error)


def test_an_aborted_load_is_dropped():
    twin = adam_twin()
    twin.step(random_grads(twin))
    before = unpack_tree(twin.shard.state())
    assert (
        twin.shard.prepare_load(
            "x", group_options(twin.reference), pack_tree(loaded_state(twin, 2.0))
        )
        is None
    )
    twin.shard.abort_load("x")
    twin.shard.abort_load("x")  # idempotent
    with pytest.raises(KeyError):
        twin.shard.commit_load("x")
    torch.testing.assert_close(unpack_tree(twin.shard.state()), before, rtol=0, atol=0)
    twin.step(random_grads(twin))
    twin.assert_in_sync()


# ----- sparse gradients ---------------------------------------------------------------------


def test_sparse_grads_match_torch_sparse_adam():
    torch.manual_seed(3)
    tensors = [torch.randn(6, 3), torch.randn(4)]
    twin = Twin(torch.optim.SparseAdam, tensors, [0, 0], [{"lr": 0.05}], ids=[0, 1])
    embedding = torch.nn.Embedding(6, 3, sparse=True)
    for rows in ([1, 4, 1], [0, 5], [2, 4, 4, 3]):
        embedding.zero_grad()
        (embedding(torch.tensor(rows)) * torch.randn(len(rows), 3)).sum().backward()
        grad = embedding.weight.grad.coalesce()
        dense = torch.sparse_coo_tensor(
            torch.tensor([[0, 3]]), torch.randn(2), (4,), check_invariants=True
        ).coalesce()
        sparse = {
            0: SparseGrad(grad.indices().numpy(), grad.values().numpy()),
            1: SparseGrad(dense.indices().numpy(), dense.values().numpy()),
        }
        twin.step([None, None], sparse_torch={0: grad, 1: dense}, sparse=sparse)
        twin.assert_in_sync()


def test_sparse_adam_skips_params_without_a_sparse_grad():
    torch.manual_seed(4)
    twin = Twin(
        torch.optim.SparseAdam, [torch.randn(3, 2), torch.randn(3, 2)], [0, 0], [{"lr": 0.1}]
    )
    grad = torch.sparse_coo_tensor(
        torch.tensor([[2]]), torch.ones(1, 2), (3, 2), check_invariants=True
    ).coalesce()
    sparse = {1: SparseGrad(grad.indices().numpy(), grad.values().numpy())}
    result = twin.step([None, None], sparse_torch={1: grad}, sparse=sparse)
    assert result.new_state_ids == (11,)
    twin.assert_in_sync()


# ----- ShardHost ----------------------------------------------------------------------------


def test_shard_host_holds_shards_by_key():
    host = ShardHost()  # the plain class; runtime makes it a Ray actor
    tensors = [torch.randn(3), torch.randn(2)]
    block = make_block(tensors, [0, 1], [0, 0])
    adagrad = ShardSpec(torch.optim.Adagrad, {"lr": 0.1}, ({"lr": 0.1},), block)
    adam = ShardSpec(torch.optim.Adam, {}, ({"lr": 0.1},), block)

    assert host.create("a/0", 0, adagrad) == ((0, 1), None)
    assert host.create("b/1", 1, adam) == ((), None)
    info = host.info()
    assert (info["device"], info["shards"], info["pid"]) == (
        str(host.device),
        ["a/0", "b/1"],
        os.getpid(),
    )
    assert host.status("b/1").shard_index == 1

    layout = block.layout
    grads = to_numpy(layout.pack([torch.ones(3), torch.ones(2)]))
    result = host.step("b/1", StepRequest(0, ({"lr": 0.1},), grads, (True, True), {}))
    assert result.new_state_ids == (0, 1)
    torch.testing.assert_close(
        values(layout, result.params)[0], tensors[0] - 0.1, rtol=0, atol=1e-6
    )

    host.drop("a/0")
    host.drop("a/0")  # dropping twice is fine
    assert host.info()["shards"] == ["b/1"]
    with pytest.raises(KeyError, match="no shard 'a/0'"):
        host.status("a/0")


def test_shared_memory_buffers_are_the_shards_own_memory():
    """With shared memory the proxy writes gradients and reads parameters in place."""
    tensors = [torch.randn(3, 2), torch.randn(5)]
    block = make_block(tensors, [0, 1], [0, 0])
    shard = Shard(0, ShardSpec(torch.optim.SGD, {"lr": 0.5}, ({"lr": 0.5},), block), "cpu", True)
    buffers = shard.shared_buffers()
    assert buffers is not None and buffers.nbytes == block.layout.nbytes
    params_map = torch.from_file(
        buffers.param_path, shared=True, size=buffers.nbytes, dtype=torch.uint8
    )
    grads_map = torch.from_file(
        buffers.grad_path, shared=True, size=buffers.nbytes, dtype=torch.uint8
    )
    os.unlink(buffers.param_path)
    os.unlink(buffers.grad_path)
    layout = block.layout
    for i in range(2):
        layout.view(grads_map, i).fill_(1.0)
    result = shard.step(StepRequest(0, ({"lr": 0.5},), None, (True, True), {}))
    assert result.params is None
    assert_same_tensors([layout.view(params_map, i) for i in range(2)], [t - 0.5 for t in tensors])
    # the proxy writes a changed parameter straight into the master copy
    layout.view(params_map, 1).fill_(7.0)
    assert torch.all(shard._params[1] == 7.0)
    shard.close()  # the files are already gone: closing twice-removed files is fine


def test_shared_memory_files_move_on_add_param_group_and_go_on_close():
    block = make_block([torch.randn(4)], [0], [0])
    shard = Shard(0, ShardSpec(torch.optim.SGD, {"lr": 0.1}, ({"lr": 0.1},), block), "cpu", True)
    first = shard.shared_buffers()
    moved = shard.add_param_group({"lr": 0.1}, make_block([torch.randn(6)], [1], [1]))
    assert moved.param_path != first.param_path and not os.path.exists(first.param_path)
    assert os.path.exists(moved.param_path) and moved.nbytes == shard._layout.nbytes
    shard.close()
    assert not os.path.exists(moved.param_path) and not os.path.exists(moved.grad_path)


def test_shared_memory_falls_back_whole_when_dev_shm_fills(monkeypatch):
    """No half-shared shard: if the second buffer finds no room, neither stays in /dev/shm."""
    from shardopt.core import shm as shm_module

    real_create, calls = shm_module.create, []

    def create(nbytes):
        calls.append(nbytes)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_create(nbytes)

    monkeypatch.setattr(shm_module, "create", create)
    block = make_block([torch.randn(4)], [0], [0])
    shard = Shard(0, ShardSpec(torch.optim.SGD, {"lr": 0.1}, ({"lr": 0.1},), block), "cpu", True)
    assert shard.shared_buffers() is None
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"shardopt-{os.getpid()}-")]
    grads = to_numpy(block.layout.pack([torch.ones(4)]))
    result = shard.step(StepRequest(0, ({"lr": 0.1},), grads, (True,), {}))
    assert result.params is not None  # the object-store path
