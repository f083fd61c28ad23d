"""Unit tests of shardopt.core.plan: the deterministic greedy placement of whole tensors.

Most tests pin ZeroRedundancyOptimizer's rule by bytes alone (``tensor_cost=0``); the last ones
the per-tensor cost the default adds (splitting: tests/test_split.py)."""

from __future__ import annotations

import random

import pytest

from shardopt.core.plan import TENSOR_COST, Piece, ShardPlan, TensorSize


def plan(param_bytes: list[int], num_shards: int) -> ShardPlan:
    return ShardPlan.empty(num_shards).extended(param_bytes, tensor_cost=0)


def reference_greedy(param_bytes: list[int], loads: list[int]) -> list[int]:
    """The rule in prose: largest first (ties to the lower id) onto the least-loaded shard
    (ties to the lower index)."""
    loads = list(loads)
    owners = [-1] * len(param_bytes)
    for pid in sorted(range(len(param_bytes)), key=lambda i: (-param_bytes[i], i)):
        least = min(loads)
        shard = loads.index(least)
        owners[pid] = shard
        loads[shard] += param_bytes[pid]
    return owners


def test_empty_plan():
    p = ShardPlan.empty(3)
    assert p.num_shards == 3
    assert p.owners == ()
    assert p.shard_bytes == (0, 0, 0)
    assert p.params_of(0) == []


@pytest.mark.parametrize("num_shards", [0, -1])
def test_empty_rejects_fewer_than_one_shard(num_shards):
    with pytest.raises(ValueError, match="Invalid num_shards"):
        ShardPlan.empty(num_shards)


def test_largest_first_onto_the_least_loaded_shard():
    # 400 -> s0, 300 -> s1, 200 -> s2; 100 -> s2 (loads 400/300/200);
    # 50 -> s1 (loads 400/300/300: the lower index of the two tied shards).
    p = plan([100, 400, 50, 300, 200], 3)
    assert p.owners == (2, 0, 1, 1, 2)
    assert p.shard_bytes == (400, 350, 300)
    assert sum(p.shard_bytes) == 1050


def test_ties_go_to_the_lower_shard_index_and_the_lower_param_id():
    p = plan([8, 8, 8, 8], 2)
    # Equal sizes are placed in id order: 0 -> s0, 1 -> s1, 2 -> s0, 3 -> s1.
    assert p.owners == (0, 1, 0, 1)
    assert p.shard_bytes == (16, 16)

    # Zero-byte tensors do not change any load, so they all land on the same least-loaded shard.
    p = plan([0, 0, 0], 2)
    assert p.owners == (0, 0, 0)
    assert plan([6, 0, 0], 2).owners == (0, 1, 1)


def test_single_shard_owns_everything():
    p = plan([5, 1, 9], 1)
    assert p.owners == (0, 0, 0)
    assert p.shard_bytes == (15,)
    assert p.params_of(0) == [0, 1, 2]


def test_more_shards_than_tensors_leaves_empty_shards():
    p = plan([10, 30], 5)
    assert p.owners == (1, 0)
    assert p.shard_bytes == (30, 10, 0, 0, 0)
    assert [p.params_of(s) for s in range(5)] == [[1], [0], [], [], []]


def test_plan_is_deterministic():
    sizes = [random.Random(7).randrange(1, 10_000) for _ in range(50)]
    first = plan(sizes, 4)
    assert all(plan(list(sizes), 4) == first for _ in range(3))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_matches_the_greedy_rule_and_is_balanced(seed, num_shards):
    rng = random.Random(seed)
    sizes = [rng.choice([4, 64, 256, 4096, rng.randrange(1, 1 << 20)]) for _ in range(40)]
    p = plan(sizes, num_shards)

    assert list(p.owners) == reference_greedy(sizes, [0] * num_shards)
    loads = [sum(b for b, o in zip(sizes, p.owners) if o == s) for s in range(num_shards)]
    assert list(p.shard_bytes) == loads
    # Greedy LPT: no shard exceeds the lightest by more than the largest tensor.
    assert max(loads) - min(loads) <= max(sizes)


def test_extended_never_moves_existing_params():
    first = plan([1000, 10, 10], 2)
    assert first.owners == (0, 1, 1)
    second = first.extended([5, 2000, 7], tensor_cost=0)

    assert second.owners[:3] == first.owners
    assert len(second.owners) == 6
    # Placed against the existing loads (1000 vs 20): 2000 -> s1, then 7 -> s0, 5 -> s0.
    assert second.owners[3:] == (0, 1, 0)
    assert second.shard_bytes == (1012, 2020)
    assert list(second.owners[3:]) == reference_greedy([5, 2000, 7], list(first.shard_bytes))


def test_extended_in_steps_keeps_every_earlier_owner():
    rng = random.Random(3)
    p = ShardPlan.empty(3)
    for _ in range(6):
        before = p
        p = p.extended([rng.randrange(1, 500) for _ in range(rng.randrange(0, 5))], tensor_cost=0)
        assert p.owners[: len(before.owners)] == before.owners
        assert sum(p.shard_bytes) >= sum(before.shard_bytes)
    assert p.extended([]) == p


def test_plan_is_immutable():
    p = plan([1, 2], 2)
    with pytest.raises(AttributeError):
        p.owners = (0, 0)  # type: ignore[misc]
    p.extended([3], tensor_cost=0)
    assert p.owners == (1, 0)


def test_params_of_lists_ids_in_increasing_order():
    p = plan([1, 50, 2, 40, 3, 30], 2)
    # 50 -> s0, 40 -> s1, 30 -> s1, then 3, 2 and 1 -> s0 (53, 55, 56 against 70).
    assert p.owners == (0, 0, 0, 1, 0, 1)
    assert p.params_of(0) == [0, 1, 2, 4]
    assert p.params_of(1) == [3, 5]
    assert sorted(p.params_of(0) + p.params_of(1)) == list(range(6))
    assert p.params_of(7) == []


def test_describe_names_every_shard():
    text = plan([16, 8], 3).describe()
    assert text.splitlines() == [
        "ShardPlan over 3 shard(s):",
        "  shard 0: params [0], 16 bytes",
        "  shard 1: params [1], 8 bytes",
        "  shard 2: params [], 0 bytes",
    ]


# ----- the per-tensor cost ------------------------------------------------------------------------


def test_many_small_tensors_are_shared_out_not_piled_beside_a_big_one():
    """A model whose embedding is 40 % of its bytes and the rest in many small tensors: by bytes
    alone the embedding's shard gets few of the small tensors (each step's per-tensor work
    lands on the other); with the per-tensor cost the shards' loads (bytes + a cost per
    tensor) even out."""
    sizes = [400_000 * 4] + [600 * 4] * 1000  # 1.6 MB, then 1,000 tensors of 2.4 KB
    by_bytes = plan(sizes, 2)
    assert [len(by_bytes.params_of(s)) for s in range(2)] == [168, 833]
    p = ShardPlan.empty(2).extended(sizes)  # the default cost
    assert p == ShardPlan.empty(2).extended(sizes, tensor_cost=TENSOR_COST)
    counts = [len(p.params_of(s)) for s in range(2)]
    assert counts[0] > 168 + 100
    loads = [p.shard_bytes[s] + TENSOR_COST * counts[s] for s in range(2)]
    assert abs(loads[0] - loads[1]) <= 600 * 4 + TENSOR_COST  # within one small tensor


def test_tensor_cost_never_stops_a_split_by_bytes():
    """A splittable tensor too big for any shard's bytes is cut by bytes as before, whatever
    the shards' tensor counts; each piece then counts one tensor."""
    sizes = [TensorSize(64_000, rows=500, splittable=True, row_numel=32)] + [40] * 30
    p = ShardPlan.empty(2).extended(sizes, tensor_cost=1000)
    q = ShardPlan.empty(2).extended(sizes, tensor_cost=0)
    assert p.is_split(0) and p.pieces[0] == q.pieces[0]
    assert p.shard_bytes[0] + p.shard_bytes[1] == sum([64_000] + [40] * 30)


def test_tensor_cost_counts_the_tensors_a_shard_already_holds():
    first = ShardPlan.empty(2).extended([404, 100, 100, 100, 100], tensor_cost=0)
    assert first.shard_bytes == (404, 400)
    assert [len(first.params_of(s)) for s in range(2)] == [1, 4]
    assert first.extended([8], tensor_cost=0).owners[-1] == 1  # by bytes: the lighter
    assert first.extended([8], tensor_cost=50).owners[-1] == 0  # 454 against 600


def test_with_pieces_keeps_a_recorded_layout_and_refuses_one_that_does_not_fit():
    """A resumed session's parameters go where its record says (whatever rule placed them):
    the plan takes the pieces as given, with their bytes, and refuses pieces that do not lay
    out each parameter's rows in order, one shard each."""
    sizes = [TensorSize(4000, rows=10, splittable=True, row_numel=100), 64, 64]
    made = ShardPlan.empty(2).extended(sizes, tensor_cost=0)
    assert ShardPlan.empty(2).with_pieces(sizes, made.pieces) == made
    given = ((Piece(1, 0, 4), Piece(0, 4, 10)), (Piece(1, 0, 1),), (Piece(1, 0, 1),))
    p = ShardPlan.empty(2).with_pieces(sizes, given)
    assert p.pieces == given and p.shard_bytes == (2400, 1600 + 128)
    bad = {
        "a gap": ((Piece(1, 0, 4), Piece(0, 5, 10)), given[1], given[2]),
        "short": ((Piece(1, 0, 4), Piece(0, 4, 9)), given[1], given[2]),
        "one shard twice": ((Piece(1, 0, 4), Piece(1, 4, 10)), given[1], given[2]),
        "no such shard": ((Piece(2, 0, 10),), given[1], given[2]),
        "no piece": ((), given[1], given[2]),
    }
    for what, pieces in bad.items():
        with pytest.raises(ValueError, match="do not lay out"):
            ShardPlan.empty(2).with_pieces(sizes, pieces)
            pytest.fail(f"{what}: taken")
    with pytest.raises(ValueError, match="pieces for 2 parameters, not 3"):
        ShardPlan.empty(2).with_pieces(sizes, given[:2])
