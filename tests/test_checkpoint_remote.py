"""Checkpoints in object storage: a real S3-compatible server (moto's) on loopback, with s3fs.

The shards write their own objects from their actors (their environment holds the server's
endpoint and test credentials: tests/conftest.py sets them before Ray starts); loads reshard;
a killed shard or a damaged object leaves no loadable half checkpoint; the gateway and the CLI
take the same URLs. Skipped, with the reason, where the server cannot start.
"""

from __future__ import annotations

import re
import uuid

import pytest
import torch
from helpers import assert_same_params, assert_same_state_dict, make_model, train_step
from torch import nn

import shardopt
from shardopt.checkpoint.integrity import METADATA, RECORD_PREFIX
from shardopt.checkpoint.storage import location
from shardopt.gateway.admission import checkpoint_path, token_scope
from shardopt.gateway.auth import principal_of

KW = {"lr": 1e-2, "weight_decay": 0.1, "foreach": True}
TOKEN = "token-of-the-s3-client-0123456789"


@pytest.fixture(scope="module")
def bucket(s3):
    return s3.bucket(f"shardopt-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def url(bucket):
    """A fresh checkpoint URL in the test bucket."""
    return f"{bucket}/run-{uuid.uuid4().hex[:8]}/step"


def objects(s3, url: str) -> list[str]:
    """The names of the objects directly under a checkpoint URL."""
    fs = s3.filesystem()
    root = url.removeprefix("s3://")
    return sorted(name.rpartition("/")[2] for name in fs.ls(root, detail=False))


def data_objects(s3, url: str) -> list[str]:
    return [n for n in objects(s3, url) if n.endswith(".distcp")]


def trained(num_shards: int = 2, steps: int = 3):
    model = make_model()
    opt = shardopt.AdamW(model.parameters(), num_shards=num_shards, **KW)
    for k in range(steps):
        train_step(model, opt, k)
    return model, opt


# ----- locations and gateway paths (no server) --------------------------------------------------


def test_locations_of_object_stores():
    pytest.importorskip("s3fs", reason="s3:// locations need s3fs")
    assert location("s3://bucket/run/step-100/") == "s3://bucket/run/step-100"
    assert location("file:///tmp/x") == "/tmp/x"
    assert location("memory://a/b/") == "memory://a/b"
    for bad, why in [
        ("nosuchfs://b/x", "unsupported checkpoint location nosuchfs://"),
        ("simplecache::s3://b/x", "chained"),
        ("s3://b/x?versionId=1", "no query"),
        ("s3://", "names no bucket"),
    ]:
        with pytest.raises(ValueError, match=why):
            location(bad)


def test_gateway_paths_under_an_object_store_stay_in_the_tokens_prefix():
    root, scope, principal = "s3://bucket/gw", token_scope(TOKEN), principal_of(TOKEN)
    assert checkpoint_path(root, principal, "run/step-1") == f"{root}/{scope}/run/step-1"
    assert checkpoint_path(root, principal, "run//a/./b") == f"{root}/{scope}/run/a/b"
    for bad in ("../up", "/abs", "", "a\\b"):
        with pytest.raises(ValueError, match="must be relative"):
            checkpoint_path(root, principal, bad)
    outside = ("s3://other-bucket/x", "gs://b/x", "a::memory://x", "a?b", "a#b", "*", "a b")
    for bad in (*outside, "run/.metadata", "a%2F..", "."):
        with pytest.raises(ValueError, match="letters, digits"):
            checkpoint_path(root, principal, bad)


def test_the_test_server_is_reached_directly_whatever_proxy_is_set(s3, bucket, monkeypatch):
    """Requests to the local server stay on loopback: a proxy in the environment is bypassed."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    fs = s3.filesystem()
    path = f"{bucket.removeprefix('s3://')}/direct-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(path, b"direct")
    assert fs.cat_file(path) == b"direct"
    fs.rm_file(path)


# ----- save, load, reshard -------------------------------------------------------------------


def test_object_uploads_are_hashed_as_they_go_out(s3, url):
    """A shard's data object gets its slices' SHA-256 from the bytes it sent, not a read-back;
    they are the digests of what the store holds."""
    from shardopt.checkpoint import format as checkpoint
    from shardopt.checkpoint.integrity import digest_file
    from shardopt.checkpoint.storage import digests_written

    state = {"state": {"0": {"exp_avg": torch.randn(300, 7), "step": torch.tensor(3.0)}}}
    save = checkpoint.ShardSave(url, state | {"param_groups": [{"lr": 0.1}]}, True)
    (plan,), _ = checkpoint.coordinate([save.local_plan()], "0123456789ab")
    save.start_writing(plan)
    results, digests = save.wait()
    ((name, entry),) = digests.items()
    hashed = digests_written(save.writer, name)
    assert len(hashed) == len(results) == len(entry["slices"]) == 3  # one range per item
    slices = [(r.storage_data.offset, r.storage_data.length) for r in results]
    assert digest_file(url, name, slices) == entry  # read back from the store: the same


def test_each_shard_writes_its_object_and_any_shard_count_loads(s3, url):
    model, opt = trained()
    opt.save_checkpoint(url)
    names = objects(s3, url)
    data = data_objects(s3, url)
    (record,) = [n for n in names if n.startswith(RECORD_PREFIX)]
    assert names == sorted([METADATA, record, *data])  # no lock object: there is none to take
    (save_id,) = {re.fullmatch(r"__[01]_([0-9a-f]+)_0\.distcp", n)[1] for n in data}
    assert data == [f"__0_{save_id}_0.distcp", f"__1_{save_id}_0.distcp"]
    other = make_model(seed=5)
    other.load_state_dict(model.state_dict())
    loaded = shardopt.AdamW(other.parameters(), num_shards=3, lr=0.5)
    loaded.load_checkpoint(url + "/")  # the same location, however spelt
    assert loaded.param_groups[0]["lr"] == KW["lr"]
    assert_same_state_dict(loaded.state_dict(), opt.state_dict())
    for k in range(3, 5):
        train_step(model, opt, k)
        train_step(other, loaded, k)
        assert_same_params(model, other)
    loaded.close()
    opt.close()


def test_signed_checkpoints_on_s3(s3, url):
    _, opt = trained(num_shards=2, steps=1)
    key, other_key = b"k" * 32, b"o" * 32
    opt.save_checkpoint(url, key=key)
    opt.load_checkpoint(url, key=key)
    with pytest.raises(ValueError, match="signed with another key"):
        opt.load_checkpoint(url, key=other_key)
    opt.close()


def test_saving_over_keeps_the_old_whole_until_the_commit_and_removes_only_what_it_replaced(
    s3, url
):
    model, opt = trained()
    opt.save_checkpoint(url)
    old_data = data_objects(s3, url)
    reader = shardopt.AdamW(make_model().parameters(), num_shards=1, **KW)
    reader.load_checkpoint(url)
    old_state = reader.state_dict()
    # an object of another process's save still writing here: no save may remove it
    foreign = "__0_0123456789ab_0.distcp"
    s3.filesystem().pipe_file(f"{url.removeprefix('s3://')}/{foreign}", b"not yet committed")
    train_step(model, opt, 3)
    new_state = opt.state_dict()
    handle = opt.save_checkpoint(url, blocking=False)
    with pytest.raises(shardopt.CheckpointInUseError):  # one save per URL in a process
        opt.save_checkpoint(url)
    reader.load_checkpoint(url)  # mid-save: the old checkpoint, whole
    assert_same_state_dict(reader.state_dict(), old_state)
    handle.wait()
    reader.load_checkpoint(url)
    assert_same_state_dict(reader.state_dict(), new_state)
    new_data = data_objects(s3, url)
    assert not set(old_data) & set(new_data)  # the replaced parts are gone, after the commit
    assert foreign in new_data and len(new_data) == 3
    assert len([n for n in objects(s3, url) if n.startswith(RECORD_PREFIX)]) == 1
    reader.close()
    opt.close()


def test_a_shard_killed_mid_save_leaves_no_half_checkpoint_and_the_previous_one_loads(s3, url):
    import ray

    params = [nn.Parameter(torch.randn(500, 400)) for _ in range(4)]
    # hosts of their own (a separate pool entry), since this test kills one
    opt = shardopt.Adam(params, num_shards=2, actor_options={"num_cpus": 0})
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.save_checkpoint(url)
    committed = objects(s3, url)
    opt.step()
    handle = opt.save_checkpoint(url, blocking=False)  # over the good one, at the same URL
    ray.kill(opt.backend.handles[1].host)
    with pytest.raises(shardopt.ShardUnavailableError):
        handle.wait()
    assert objects(s3, url) == committed  # nothing of the failed save is left
    fresh = shardopt.Adam([nn.Parameter(torch.zeros(500, 400)) for _ in range(4)], num_shards=2)
    fresh.load_checkpoint(url)
    assert all(int(s["step"]) == 1 for s in fresh.state_dict()["state"].values())
    fresh.save_checkpoint(url)  # the failed save holds nothing: the next one goes ahead
    fresh.close()
    opt.close()


def test_a_failed_save_aborts_its_unfinished_multipart_uploads(s3, url):
    """A shard killed while uploading a large object in parts leaves the parts on the store
    (no object, but stored): the save's abort aborts its uploads, and only its own."""
    from shardopt.checkpoint.commit import abort

    fs, root = s3.filesystem(), url.removeprefix("s3://")
    bucket, _, prefix = root.partition("/")
    ours, theirs = "__1_0123456789ab_0.distcp", "__0_ba9876543210_0.distcp"
    for name in (ours, theirs):  # two parts' worth started, one part sent, never completed
        upload = fs.open(f"{root}/{name}", "wb", block_size=5 * 2**20)
        upload.write(b"x" * (6 * 2**20))
        upload.flush()
        assert upload.mpu is not None
        upload.closed = True  # as a killed writer: no completion, no abort

    def unfinished() -> list[str]:
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        return sorted(u["Key"].rpartition("/")[2] for u in listing.get("Uploads", []))

    assert unfinished() == sorted([ours, theirs]) and not fs.exists(f"{root}/{ours}")
    abort(url, "0123456789ab")
    assert unfinished() == [theirs]  # another save's upload, maybe still going: left alone


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_object_is_named_and_nothing_changes(s3, url, damage):
    model, opt = trained(num_shards=2, steps=2)
    opt.save_checkpoint(url)
    name = data_objects(s3, url)[1]
    fs, path = s3.filesystem(), f"{url.removeprefix('s3://')}/{name}"
    raw = fs.cat_file(path)
    if damage == "flip":  # the same size: only the checksums see it (in the shard reading it)
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0xFF
        fs.pipe_file(path, bytes(flipped))
    elif damage == "truncate":
        fs.pipe_file(path, raw[:-100])
    else:
        fs.rm_file(path)
    other = make_model()
    loaded = shardopt.AdamW(other.parameters(), num_shards=2, **KW)
    train_step(other, loaded, 0)
    before = loaded.state_dict()
    error = FileNotFoundError if damage == "delete" else ValueError
    with pytest.raises(error, match=re.escape(f"{url}/{name}")):
        loaded.load_checkpoint(url)
    assert_same_state_dict(loaded.state_dict(), before)
    loaded.close()
    opt.close()


def test_state_this_process_holds_goes_to_the_store_too(s3, url):
    """LBFGS's gathered vectors are written by this process, not the shards: same store."""
    params = [nn.Parameter(torch.randn(20)), nn.Parameter(torch.randn(3, 4))]
    opt = shardopt.LBFGS(params, num_shards=2, history_size=3, max_iter=4)

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    opt.save_checkpoint(url)
    other = shardopt.LBFGS([nn.Parameter(p.detach().clone()) for p in params], num_shards=1)
    other.load_checkpoint(url)
    assert_same_state_dict(other.state_dict(), opt.state_dict())
    other.close()
    opt.close()


# ----- the CLI and the gateway ---------------------------------------------------------------


def test_cli_inspect_and_export_take_urls(s3, url, tmp_path, capsys):
    from shardopt.cli import main

    _, opt = trained(num_shards=2, steps=2)
    opt.save_checkpoint(url)
    assert main(["ckpt", "inspect", url]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {url}" in out and "integrity: ok" in out
    assert "parameters with state: 6, step: 2.0" in out
    assert main(["ckpt", "export", url, str(tmp_path / "opt.pt"), "--no-progress"]) == 0
    exported = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert_same_state_dict(exported, opt.state_dict())
    missing = f"{url}-never-written"
    assert main(["ckpt", "inspect", missing]) == 1
    assert "no committed checkpoint" in capsys.readouterr().out
    opt.close()


def test_gateway_checkpoint_dir_on_an_object_store(s3, bucket):
    from shardopt.gateway import serve

    root = f"{bucket}/gateway"
    gateway = serve("127.0.0.1", 0, tokens=[TOKEN], checkpoint_dir=root)
    try:
        model = make_model()
        remote = shardopt.AdamW(
            model.parameters(), lr=1e-2, address=f"127.0.0.1:{gateway.port}", token=TOKEN
        )
        train_step(model, remote, 0)
        saved = remote.state_dict()
        remote.save_checkpoint("run/step-1")
        home = f"{root}/{token_scope(TOKEN)}/run/step-1"
        assert METADATA in objects(s3, home)  # under the token's own prefix
        train_step(model, remote, 1)
        remote.load_checkpoint("run/step-1")
        assert_same_state_dict(remote.state_dict(), saved)
        for bad in ("x::memory://y", "a?versionId=1"):
            with pytest.raises(ValueError, match="letters, digits"):
                remote.save_checkpoint(bad)
        with pytest.raises(FileNotFoundError) as info:
            remote.load_checkpoint("never-written")
        assert bucket.removeprefix("s3://") not in str(info.value)  # no server URL in errors
        remote.close()
    finally:
        gateway.stop(1)
