"""Sharded checkpoints on real shards and files: DCP format, resharding, atomicity, integrity."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    assert_same_params,
    assert_same_state_dict,
    batch,
    make_model,
    mlp,
    square_step,
    train_step,
)
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import shardopt
from shardopt.checkpoint.commit import LOCK
from shardopt.checkpoint.integrity import METADATA, RECORD_PREFIX

KW = {"lr": 1e-2, "weight_decay": 0.1, "foreach": True}


def data_file(path, shard: int):
    """The committed data file of one shard (names carry a per-save id)."""
    (found,) = [
        p for p in path.iterdir() if re.fullmatch(rf"__{shard}_[0-9a-f]+_0\.distcp", p.name)
    ]
    return found


@pytest.fixture
def trained(tmp_path):
    """A model trained 3 steps on 2 shards and its checkpoint; the optimizer keeps running."""
    model = make_model()
    opt = shardopt.AdamW(model.parameters(), num_shards=2, **KW)
    for k in range(3):
        train_step(model, opt, k)
    path = tmp_path / "ckpt"
    opt.save_checkpoint(path)
    yield model, opt, path
    opt.close()


def test_checkpoint_is_a_dcp_directory_with_one_file_per_shard(trained):
    _, _, path = trained
    names = sorted(os.listdir(path))
    (record,) = [n for n in names if n.startswith(RECORD_PREFIX)]
    data = [n for n in names if n.endswith(".distcp")]
    assert names == sorted([METADATA, LOCK, record, *data])
    (save_id,) = {re.fullmatch(r"__[01]_([0-9a-f]+)_0\.distcp", n).group(1) for n in data}
    assert sorted(data) == [f"__0_{save_id}_0.distcp", f"__1_{save_id}_0.distcp"]


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_load_into_any_shard_count_continues_identically(trained, num_shards):
    model, opt, path = trained
    other = make_model(seed=5)
    other.load_state_dict(model.state_dict())
    loaded = shardopt.AdamW(other.parameters(), num_shards=num_shards, lr=0.5)
    loaded.load_checkpoint(path)
    assert loaded.param_groups[0]["lr"] == KW["lr"] and loaded.param_groups[0]["foreach"]
    assert_same_state_dict(loaded.state_dict(), opt.state_dict())
    for k in range(3, 6):
        train_step(model, opt, k)
        train_step(other, loaded, k)
        assert_same_params(model, other)
    loaded.close()


def test_plain_torch_reads_the_checkpoint(trained, tmp_path):
    """dcp_to_torch_save -> torch.load(weights_only=True) -> torch.optim.AdamW loads it."""
    model, opt, path = trained
    dcp_to_torch_save(path, tmp_path / "opt.pt")
    state_dict = torch.load(tmp_path / "opt.pt", weights_only=True)
    other = make_model(seed=5)
    other.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(other.parameters(), lr=0.5)
    plain.load_state_dict(state_dict)
    assert len(plain.state) == 6  # every parameter's state matched its id
    for k in range(3, 6):
        train_step(model, opt, k)
        train_step(other, plain, k)
        assert_same_params(model, other)


def test_async_save_holds_the_state_of_the_call(tmp_path):
    model = make_model()
    opt = shardopt.AdamW(model.parameters(), num_shards=2, **KW)
    train_step(model, opt, 0)
    at_call = opt.state_dict()
    handle = opt.save_checkpoint(tmp_path / "async", blocking=False)
    for k in range(1, 4):  # training goes on while the shards write
        train_step(model, opt, k)
    handle.wait()
    assert handle.done()
    fresh = shardopt.AdamW(make_model().parameters(), num_shards=3, **KW)
    fresh.load_checkpoint(f"file://{tmp_path / 'async'}")
    assert_same_state_dict(fresh.state_dict(), at_call)
    fresh.close()
    opt.close()


def test_an_uncommitted_save_never_loads_and_the_previous_one_still_does(tmp_path):
    """The client dies mid-save (kill -9 before the commit): no half checkpoint loads."""
    script = textwrap.dedent(
        f"""
        import os, torch, shardopt
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 200)) for _ in range(3)]
        opt = shardopt.Adam(params, num_shards=2)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.save_checkpoint({str(tmp_path / "good")!r})
        opt.step()
        opt.save_checkpoint({str(tmp_path / "torn")!r}, blocking=False)
        os.kill(os.getpid(), 9)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=240)
    assert done.returncode == -9
    assert not (tmp_path / "torn" / METADATA).exists()
    params = [nn.Parameter(torch.zeros(300, 200)) for _ in range(3)]
    opt = shardopt.Adam(params, num_shards=2)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        opt.load_checkpoint(tmp_path / "torn")
    opt.load_checkpoint(tmp_path / "good")
    assert all(int(s["step"]) == 1 for s in opt.state_dict()["state"].values())
    opt.close()


def test_saving_over_a_checkpoint_keeps_it_whole_until_the_commit(trained):
    model, opt, path = trained
    old_files = {p.name for p in path.iterdir()}
    reader = shardopt.AdamW(make_model().parameters(), num_shards=1, **KW)
    reader.load_checkpoint(path)
    old_state = reader.state_dict()
    train_step(model, opt, 3)
    new_state = opt.state_dict()
    handle = opt.save_checkpoint(path, blocking=False)
    reader.load_checkpoint(path)  # mid-save: the old checkpoint, whole
    assert_same_state_dict(reader.state_dict(), old_state)
    handle.wait()
    reader.load_checkpoint(path)
    assert_same_state_dict(reader.state_dict(), new_state)
    new_files = {p.name for p in path.iterdir()}
    assert old_files & new_files == {METADATA, LOCK}  # the old files are gone
    assert len(new_files) == len(old_files)
    reader.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_data_files_are_named_and_nothing_changes(trained, damage):
    model, opt, path = trained
    data = data_file(path, 1)
    if damage == "corrupt":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    else:
        data.unlink()
    other = make_model()
    loaded = shardopt.AdamW(other.parameters(), num_shards=2, **KW)
    train_step(other, loaded, 0)
    before = loaded.state_dict()
    error = FileNotFoundError if damage == "delete" else ValueError
    with pytest.raises(error, match=data.name):
        loaded.load_checkpoint(path)
    assert_same_state_dict(loaded.state_dict(), before)
    loaded.close()


def test_mismatched_checkpoint_is_rejected_and_changes_nothing(trained):
    _, _, path = trained
    other = mlp((6, 9, 5, 3))  # the last layer 3 wide where the checkpoint's is 2
    loaded = shardopt.AdamW(other.parameters(), num_shards=2, **KW)
    square_step(other, loaded, batch(0)[0])  # no targets of its width: the outputs' mean square
    before = loaded.state_dict()
    with pytest.raises(ValueError, match="shape"):
        loaded.load_checkpoint(path)
    assert_same_state_dict(loaded.state_dict(), before)
    smaller = shardopt.AdamW(nn.Linear(6, 9).parameters(), num_shards=2)
    with pytest.raises(ValueError, match="doesn't match the size"):
        smaller.load_checkpoint(path)
    with pytest.raises(ValueError, match="unsupported checkpoint location nosuchfs://"):
        smaller.save_checkpoint("nosuchfs://bucket/somewhere")
    loaded.close()
    smaller.close()


def test_cli_inspect_and_export(trained, tmp_path, capsys):
    from shardopt.cli import main

    model, opt, path = trained
    assert main(["ckpt", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "integrity: ok" in out and "parameters with state: 6, step: 3.0" in out
    assert data_file(path, 0).name in out and "'exp_avg': float32" in out
    assert "signature: unsigned" in out
    assert main(["ckpt", "export", str(path), str(tmp_path / "opt.pt"), "--no-progress"]) == 0
    exported = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert sorted(exported["state"]) == list(range(6))  # integer ids, as torch.optim writes
    assert_same_state_dict(exported, opt.state_dict())
    data_file(path, 0).write_bytes(b"garbage")
    assert main(["ckpt", "inspect", str(path)]) == 1
    assert "corrupted" in capsys.readouterr().out


def test_a_shard_killed_mid_save_leaves_no_checkpoint_and_the_previous_one_loads(tmp_path):
    import ray

    params = [nn.Parameter(torch.randn(500, 400)) for _ in range(4)]
    # hosts of their own (a separate pool entry), since this test kills one
    opt = shardopt.Adam(params, num_shards=2, actor_options={"num_cpus": 0})
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.save_checkpoint(tmp_path / "good")
    opt.step()
    handle = opt.save_checkpoint(tmp_path / "torn", blocking=False)
    ray.kill(opt.backend.handles[1].host)
    with pytest.raises(shardopt.ShardUnavailableError):
        handle.wait()
    assert not (tmp_path / "torn" / METADATA).exists()
    fresh = shardopt.Adam([nn.Parameter(torch.zeros(500, 400)) for _ in range(4)], num_shards=2)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        fresh.load_checkpoint(tmp_path / "torn")
    fresh.load_checkpoint(tmp_path / "good")
    assert all(int(s["step"]) == 1 for s in fresh.state_dict()["state"].values())
    fresh.close()
    opt_hosts = {h.host._actor_id for h in opt.backend.handles}
    opt.close()
    # the pool replaces the dead host: the next optimizer with these options just works
    again = shardopt.Adam(params, num_shards=2, actor_options={"num_cpus": 0})
    assert len(opt_hosts & {h.host._actor_id for h in again.backend.handles}) == 1
    again.step()
    again.close()


def test_memory_url_round_trip_and_plain_torch(tmp_path):
    """fsspec's in-process memory:// store: this process does the I/O for the shards."""
    import fsspec

    model = make_model()
    opt = shardopt.AdamW(model.parameters(), num_shards=2, **KW)
    for k in range(2):
        train_step(model, opt, k)
    opt.save_checkpoint("memory://shardopt-test/ckpt")
    fs = fsspec.filesystem("memory")
    names = sorted(os.path.basename(n) for n in fs.ls("/shardopt-test/ckpt", detail=False))
    assert METADATA in names and any(re.fullmatch(r"__1_[0-9a-f]+_0\.distcp", n) for n in names)
    other = make_model(seed=3)
    other.load_state_dict(model.state_dict())
    loaded = shardopt.AdamW(other.parameters(), num_shards=3, lr=0.5)
    loaded.load_checkpoint("memory://shardopt-test/ckpt")
    assert_same_state_dict(loaded.state_dict(), opt.state_dict())
    for k in range(2, 4):
        train_step(model, opt, k)
        train_step(other, loaded, k)
        assert_same_params(model, other)
    fs.rm("/shardopt-test", recursive=True)
    opt.close()
    loaded.close()


def test_a_checkpoint_from_before_commit_records_is_refused_with_how_to(trained):
    model, opt, path = trained
    for record in path.glob(RECORD_PREFIX + "*"):
        record.unlink()
    (path / ".shardopt-checksums.json").write_text('{"sha256": {}}')
    before = opt.state_dict()
    with pytest.raises(ValueError, match="older shardopt .* save it again"):
        opt.load_checkpoint(path)
    assert_same_state_dict(opt.state_dict(), before)
