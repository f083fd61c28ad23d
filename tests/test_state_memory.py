"""Gathering, streaming and loading state without holding it twice on the client.

``state_dict()`` fills fresh tensors straight from each shard's part (read from shared memory
without mapping it, or pulled in chunks through the object store); ``save_state_dict(path)``
writes torch.save's file from the shards' parts; ``load_state_dict`` packs one shard's part at a
time. The memory these hold is measured by ``benchmarks/state_dict_bench.py``; here, that the
numbers and the files are torch's.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state_dict, assert_same_tensors
from test_split import _params, _run

import shardopt
from shardopt.actor.shard import Shard
from shardopt.client import data_path


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "object_store"])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_save_state_dict_writes_torch_saves_file_from_the_shards(tmp_path, name, shared_memory):
    kwargs = dict(lr=1e-2, fused=True) if name == "Adam" else dict(lr=0.05, momentum=0.9)
    params, ref = _params(), _params()
    opt = getattr(shardopt, name)(params, num_shards=3, shared_memory=shared_memory, **kwargs)
    want_opt = getattr(torch.optim, name)(ref, **kwargs)
    try:
        assert opt.plan.is_split(0)
        _run(opt, params, 2)
        _run(want_opt, ref, 2)
        opt.save_state_dict(tmp_path / "opt.pt")
        saved = torch.load(tmp_path / "opt.pt", weights_only=True)
        assert_same_state_dict(saved, opt.state_dict())
        assert_same_state_dict(saved, want_opt.state_dict())
        # plain torch continues from it, and so does shardopt from the mapped file
        again = [torch.nn.Parameter(p.detach().clone()) for p in params]
        plain = getattr(torch.optim, name)(again, **kwargs)
        plain.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True, mmap=True))
        assert_same_tensors(_run(opt, params, 2, 2)[-1], _run(plain, again, 2, 2)[-1])
        assert_same_state_dict(opt.state_dict(), plain.state_dict())
    finally:
        opt.close()


def test_save_state_dict_replaces_the_file_whole_and_runs_hooks(tmp_path):
    params = _params()
    opt = shardopt.AdamW(params, lr=1e-2, num_shards=2)
    try:
        target = tmp_path / "opt.pt"
        target.write_bytes(b"the old file")
        _run(opt, params, 1)
        opt.save_state_dict(target)
        assert [p.name for p in tmp_path.iterdir()] == ["opt.pt"]  # nothing left aside
        assert torch.load(target, weights_only=True)["state"][0]["step"] == 1
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
        opt.save_state_dict(target)  # hooks: gathered and saved as torch would
        assert torch.load(target, weights_only=True)["extra"] == 7
        opt.close()
        with pytest.raises(shardopt.OptimizerClosedError):
            opt.save_state_dict(tmp_path / "other.pt")
        assert not (tmp_path / "other.pt").exists()
    finally:
        opt.close()


def test_object_store_gather_in_chunks_straddling_tensors(monkeypatch):
    monkeypatch.setattr(data_path, "STATE_CHUNK_BYTES", 1000)  # many chunks, odd boundaries
    params, ref = _params(), _params()
    opt = shardopt.RMSprop(params, lr=1e-2, momentum=0.5, num_shards=2, shared_memory=False)
    want_opt = torch.optim.RMSprop(ref, lr=1e-2, momentum=0.5)
    try:
        _run(opt, params, 2)
        _run(want_opt, ref, 2)
        assert_same_state_dict(opt.state_dict(), want_opt.state_dict())
    finally:
        opt.close()


def test_a_shard_keeps_at_most_two_packed_states():
    from shardopt.core.buffers import FlatLayout, to_numpy
    from shardopt.core.records import ParamBlock, ShardSpec

    p = torch.randn(4, 3)
    layout = FlatLayout.for_tensors([p])
    block = ParamBlock((0,), (0,), layout, to_numpy(layout.pack([p])))
    shard = Shard(0, ShardSpec(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, ({},), block))
    tokens = [shard.pack_state()[0] for _ in range(3)]
    with pytest.raises(KeyError, match="dropped"):
        shard.state_chunk(tokens[0], 0, 1)
    assert shard.state_chunk(tokens[2], 0, 0).nbytes == 0
    shard.drop_state(tokens[2])
    with pytest.raises(KeyError):
        shard.state_chunk(tokens[2], 0, 1)


def test_page_out_gives_back_only_file_pages_and_loses_nothing(tmp_path):
    from shardopt.core.mapped_files import page_out

    torch.save({"a": torch.arange(300_000.0), "b": torch.ones(5)}, tmp_path / "s.pt")
    mapped = torch.load(tmp_path / "s.pt", weights_only=True, mmap=True)
    assert mapped["a"].sum() == torch.arange(300_000.0).sum()  # paged in
    mapped["b"].mul_(3)  # a private, written page: must survive
    assert page_out([mapped["a"], mapped["b"]]) > 0
    assert torch.equal(mapped["a"], torch.arange(300_000.0))
    assert torch.equal(mapped["b"], torch.full((5,), 3.0))
    ordinary = torch.randn(100_000)
    before = ordinary.clone()
    assert page_out([ordinary]) == 0  # anonymous memory is never advised
    assert torch.equal(ordinary, before)


def test_save_state_dict_where_the_backend_cannot_stream(tmp_path):
    """LBFGS's shards hold vectors, not torch's state: the gathered dict is saved, atomically."""
    params = _params([(40, 3), (5,)])
    opt = shardopt.LBFGS(params, lr=0.5, num_shards=2)
    try:

        def closure():
            opt.zero_grad()
            loss = _loss_of(params)
            loss.backward()
            return loss

        opt.step(closure)
        opt.save_state_dict(tmp_path / "lbfgs.pt")
        assert [p.name for p in tmp_path.iterdir()] == ["lbfgs.pt"]
        assert_same_state_dict(
            torch.load(tmp_path / "lbfgs.pt", weights_only=True), opt.state_dict()
        )
    finally:
        opt.close()


def _loss_of(params):
    return sum(((p - 1.0) ** 2).sum() for p in params)


def test_save_state_dict_from_a_shard_group(tmp_path):
    params, ref = _params(), _params()
    opt = shardopt.Adam(
        params, lr=1e-2, fused=True, num_shards=3, group="state-file", world_size=1, rank=0
    )
    want_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    try:
        _run(opt, params, 2)
        _run(want_opt, ref, 2)
        opt.save_state_dict(tmp_path / "group.pt")
        assert_same_state_dict(
            torch.load(tmp_path / "group.pt", weights_only=True), want_opt.state_dict()
        )
    finally:
        opt.close()
