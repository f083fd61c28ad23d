"""GroupShardHost as a plain class in this process: sync rounds, timeouts, async staleness.

(Its parameters come back through the object store, so the session's Ray is used for that.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from shardopt.actor.shard_group_host import GroupShardHost
from shardopt.core.buffers import FlatLayout, readonly_tensor, to_numpy
from shardopt.core.errors import GroupTimeoutError
from shardopt.core.records import GroupConfig, ParamBlock, PushRequest, ShardSpec

OPTIONS = {"lr": 0.5, "momentum": 0.0, "dampening": 0, "weight_decay": 0, "nesterov": False,
           "maximize": False, "foreach": None, "differentiable": False, "fused": None}  # fmt: skip


def make_host(mode="sync", world_size=2, max_staleness=None, timeout_s=30.0):
    config = GroupConfig(world_size, mode, max_staleness, timeout_s, 1, None, (), ())
    host = GroupShardHost("unit", config)
    tensors = [torch.zeros(3)]
    layout = FlatLayout.for_tensors(tensors)
    block = ParamBlock((0,), (0,), layout, to_numpy(layout.pack(tensors)))
    host.create("unit/0", 0, ShardSpec(torch.optim.SGD, {"lr": 0.5}, (OPTIONS,), block), None)
    return host, layout


def request(rank, version, grad, layout, **options):
    flat = layout.pack([torch.full((3,), float(grad))])
    return PushRequest(rank, version, ({**OPTIONS, **options},), to_numpy(flat), (True,), {})


def params_of(result, layout):
    return layout.view(readonly_tensor(ray.get(result.current.params)), 0).clone()


def both(host, layout, version, **options):
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(host.push, "unit/0", request(r, version, r + 1, layout, **options))
            for r in range(2)
        ]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def test_sync_round_averages_in_rank_order_and_all_ranks_get_the_same_answer():
    host, layout = make_host()
    first, second = both(host, layout, 0)
    assert first.applied_version == second.applied_version == 0
    assert first.current is second.current or first.current == second.current
    # mean gradient (1 + 2) / 2 = 1.5, lr 0.5
    assert torch.equal(params_of(first, layout), torch.full((3,), -0.75))
    assert host.version() == 1


def test_a_failed_round_fails_every_rank_and_a_retry_succeeds_for_all():
    host, layout = make_host()
    outcomes = both(host, layout, 0, lr="not a number")  # torch raises inside the step
    assert all(isinstance(o, TypeError) for o in outcomes)
    assert host.version() == 0
    retry = both(host, layout, 0)
    assert [r.applied_version for r in retry] == [0, 0]
    assert host.version() == 1


def test_a_missing_rank_times_out_and_the_push_is_withdrawn():
    host, layout = make_host(timeout_s=0.3)
    with pytest.raises(GroupTimeoutError, match=r"rank\(s\) \[1\]"):
        host.push("unit/0", request(0, 0, 1, layout))
    assert host.version() == 0 and host._round == {}
    assert [r.applied_version for r in both(host, layout, 0)] == [0, 0]


def test_sync_refuses_pushes_for_other_versions_and_duplicates():
    host, layout = make_host(timeout_s=0.3)
    with pytest.raises(ValueError, match="only at version 0"):
        host.push("unit/0", request(0, 5, 1, layout))
    both(host, layout, 0)
    with pytest.raises(ValueError, match="pull_params"):
        host.push("unit/0", request(0, 0, 1, layout))


def test_async_staleness_bound():
    host, layout = make_host(mode="async", max_staleness=1)
    answers = [host.push("unit/0", request(0, 0, 1, layout)) for _ in range(3)]
    assert [a.applied_version for a in answers] == [0, 1, None]
    assert [a.staleness for a in answers] == [0, 1, None]
    assert answers[2].current.version == 2  # the refused worker gets the current parameters
    assert torch.equal(params_of(answers[2], layout), torch.full((3,), -1.0))
