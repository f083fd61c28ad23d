"""Attacks on checkpoints, each on real files, real shards and a real gateway on 127.0.0.1.

A forged ``.metadata`` whose pickle would run code (create a marker file), data tampered with the
checksums recomputed, a checkpoint signed with another key, metadata built to mutate classes or
exhaust memory, and concurrent saves to one directory. Every attack fails with a clear error
naming what it refused, no marker file appears, and the victim optimizer's state is unchanged.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import uuid

import pytest
import torch
from helpers import assert_same_state_dict, make_model, same_state_dict, train_step
from torch.distributed.checkpoint import metadata as dcp_metadata

import shardopt
from shardopt.checkpoint import format as checkpoint
from shardopt.checkpoint.commit import LOCK
from shardopt.checkpoint.integrity import (
    KEY_ENV,
    METADATA,
    RECORD_PREFIX,
    digest_file,
    make_record,
    read_key,
)
from shardopt.gateway import serve
from shardopt.gateway.admission import token_scope

KEY = bytes.fromhex("6b1f0c9d2e8a4b7f90d1c3e5a7b9f2d4c6e8a0b2d4f6a8c0e2b4d6f8a0c2e4f6")
OTHER_KEY = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0")
TOKEN = "checkpoint-security-token-0123"
SIZES = (6, 9, 2)
"""The layer widths of the victims' models."""


# ----- the attacker's tools ---------------------------------------------------------------------


class OpensAFile:
    """Unpickled, creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsAShell:
    """Unpickled, runs ``touch marker`` in a shell (``os.system``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


PAYLOADS = {"open": OpensAFile, "os.system": RunsAShell}


def forged_metadata(kind: str, marker) -> bytes:
    return pickle.dumps(PAYLOADS[kind](str(marker)))


def record_of(path) -> tuple:
    (found,) = path.glob(RECORD_PREFIX + "*")
    return found, json.loads(found.read_text())


def reseal(path, key: bytes | None = None, keep_signature: bool = False) -> None:
    """What write access to the directory gives an attacker without our key: a fresh commit
    record for ``.metadata`` and the data files as they are now, unsigned or signed with
    ``key`` (theirs); ``keep_signature`` copies the old signature over unchanged."""
    old_path, old = record_of(path)
    files = {
        name: digest_file(
            str(path), name, [tuple(int(x) for x in k.split("+")) for k in entry["slices"]]
        )
        for name, entry in old["files"].items()
    }
    name, raw = make_record((path / METADATA).read_bytes(), files, key)
    if keep_signature:
        record = json.loads(raw)
        record["signature"] = old["signature"]
        raw = json.dumps(record).encode()
    old_path.unlink()
    (path / name).write_bytes(raw)


@pytest.fixture
def victim(tmp_path):
    """An optimizer, its checkpoint (unsigned) and signed copy, and a step taken since."""
    model = make_model(sizes=SIZES)
    opt = shardopt.AdamW(model.parameters(), num_shards=2, lr=1e-2)
    for k in range(2):
        train_step(model, opt, k)
    opt.save_checkpoint(tmp_path / "plain")
    opt.save_checkpoint(tmp_path / "signed", key=KEY)
    train_step(model, opt, 2)
    yield opt, tmp_path
    opt.close()


def test_the_payloads_do_run_code_under_plain_pickle(tmp_path):
    """The control: what the attacks below would do if anything unpickled them plainly."""
    for kind in PAYLOADS:
        marker = tmp_path / f"control-{kind}"
        pickle.loads(forged_metadata(kind, marker))
        assert marker.exists()


# ----- a forged .metadata ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@pytest.mark.parametrize(
    ("which", "resealed", "match"),
    [
        ("plain", False, r"\.metadata matches no commit record"),  # the checksum of .metadata
        ("plain", True, r"refusing to unpickle .*\.metadata: it names (io\.open|posix\.system)"),
        ("signed", True, "is not signed"),  # with a key: the signature, before any unpickling
    ],
)
def test_a_forged_metadata_runs_nothing_and_changes_nothing(victim, kind, which, resealed, match):
    opt, tmp_path = victim
    path, marker = tmp_path / which, tmp_path / "pwned"
    (path / METADATA).write_bytes(forged_metadata(kind, marker))
    if resealed:
        reseal(path)
    key = KEY if which == "signed" else None
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_checkpoint(path, key=key)
    with pytest.raises(ValueError, match=match):
        checkpoint.verify(path, key=key)
    assert checkpoint.describe(path, key=key)["integrity"].startswith("FAILED")
    assert not marker.exists()
    assert_same_state_dict(opt.state_dict(), before)


@pytest.mark.parametrize("resealed", [False, True])
def test_cli_inspect_and_export_refuse_a_forged_metadata(victim, resealed, capsys):
    from shardopt.cli import main

    _, tmp_path = victim
    path, marker = tmp_path / "plain", tmp_path / "pwned"
    (path / METADATA).write_bytes(forged_metadata("os.system", marker))
    if resealed:
        reseal(path)
    assert main(["ckpt", "inspect", str(path)]) == 1
    assert "integrity: FAILED" in capsys.readouterr().out
    assert main(["ckpt", "export", str(path), str(tmp_path / "out.pt"), "--no-progress"]) == 1
    assert METADATA in capsys.readouterr().out
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_cli_key_file_flag_and_environment(victim, capsys, monkeypatch):
    from shardopt.cli import main

    _, tmp_path = victim
    key_file, short = tmp_path / "key", tmp_path / "short"
    key_file.write_text(KEY.hex() + "\n")
    short.write_text("too short\n")
    signing_key = read_key(key_file)
    checkpoint.verify(tmp_path / "plain")
    opt = shardopt.SGD(make_model(sizes=SIZES).parameters(), lr=0.1, num_shards=1)
    opt.save_checkpoint(tmp_path / "by-file", key=signing_key)
    flag = ["--checkpoint-key-file", str(key_file)]
    assert main(["ckpt", "inspect", str(tmp_path / "by-file"), *flag]) == 0
    out = capsys.readouterr().out
    assert "integrity: ok" in out and "signature: ok (key id" in out
    assert main(["ckpt", "inspect", str(tmp_path / "plain"), *flag]) == 1
    assert "is not signed" in capsys.readouterr().out
    monkeypatch.setenv(KEY_ENV, str(key_file))
    out_pt = tmp_path / "out.pt"
    assert main(["ckpt", "export", str(tmp_path / "plain"), str(out_pt), "--no-progress"]) == 1
    assert "is not signed" in capsys.readouterr().out and not out_pt.exists()
    assert main(["ckpt", "export", str(tmp_path / "by-file"), str(out_pt), "--no-progress"]) == 0
    monkeypatch.setenv(KEY_ENV, str(short))
    with pytest.raises(SystemExit, match="at least 16"):
        main(["ckpt", "inspect", str(tmp_path / "by-file")])
    opt.close()


# ----- tampered data, other keys ---------------------------------------------------------------


def tamper_exp_avg(path, state: dict) -> torch.Tensor:
    """Overwrites one parameter's ``exp_avg`` in place in its data file (still a valid file)."""
    value = state["state"][0]["exp_avg"]
    old, new = value.numpy().tobytes(), torch.full_like(value, 7.0).numpy().tobytes()
    for data in path.glob("*.distcp"):
        raw = data.read_bytes()
        if raw.count(old) == 1:
            data.write_bytes(raw.replace(old, new))
            return torch.full_like(value, 7.0)
    raise AssertionError("exp_avg of parameter 0 not found")


def test_tampered_data_with_recomputed_checksums_loads_only_without_a_key(victim):
    """Checksums detect corruption, not forgery: without a key the forgery loads (the
    documented limit); with a key, every way of re-recording it is refused."""
    opt, tmp_path = victim
    fresh = shardopt.AdamW(make_model(sizes=SIZES).parameters(), num_shards=2, lr=1e-2)
    fresh.load_checkpoint(tmp_path / "plain")
    saved = fresh.state_dict()
    forged = tamper_exp_avg(tmp_path / "plain", saved)
    with pytest.raises(ValueError, match="corrupted"):  # the recorded checksums catch it
        fresh.load_checkpoint(tmp_path / "plain")
    reseal(tmp_path / "plain")
    fresh.load_checkpoint(tmp_path / "plain")
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], forged)
    fresh.close()

    path = tmp_path / "signed"
    tamper_exp_avg(path, saved)
    before = opt.state_dict()
    for resign, match in [
        ({"keep_signature": True}, "has a wrong signature"),
        ({}, "is not signed"),
        ({"key": OTHER_KEY}, "was signed with another key"),
    ]:
        reseal(path, **resign)
        with pytest.raises(ValueError, match=match):
            opt.load_checkpoint(path, key=KEY)
        assert_same_state_dict(opt.state_dict(), before)


def test_a_checkpoint_signed_with_another_key_is_refused(victim):
    opt, tmp_path = victim
    other = shardopt.AdamW(make_model(1, SIZES).parameters(), num_shards=1, lr=5.0)
    other.save_checkpoint(tmp_path / "theirs", key=OTHER_KEY)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="signed with another key"):
        opt.load_checkpoint(tmp_path / "theirs", key=KEY)
    with pytest.raises(ValueError, match="is not signed"):
        opt.load_checkpoint(tmp_path / "plain", key=KEY)
    assert_same_state_dict(opt.state_dict(), before)
    opt.load_checkpoint(tmp_path / "theirs")  # without a key: intact, so it loads
    assert opt.param_groups[0]["lr"] == 5.0
    other.close()


def test_values_are_read_weights_only(victim):
    """An object in the param groups that a full unpickle would build (run) is refused."""
    import torch.distributed.checkpoint as dcp

    opt, tmp_path = victim
    marker = tmp_path / "pwned"
    commit = checkpoint.verify(tmp_path / "plain")
    tampered = checkpoint._read_keys(commit, {"param_groups", "state"})
    tampered["param_groups"][0]["evil"] = RunsAShell(str(marker))
    bad = tmp_path / "bad"
    dcp.save(tampered, checkpoint_id=bad, no_dist=True)
    metadata = pickle.loads((bad / METADATA).read_bytes())  # the attacker's own: plain DCP
    slices: dict = {}
    for info in metadata.storage_data.values():
        slices.setdefault(info.relative_path, []).append((info.offset, info.length))
    files = {n: digest_file(str(bad), n, s) for n, s in slices.items()}
    name, raw = make_record((bad / METADATA).read_bytes(), files, None)
    (bad / name).write_bytes(raw)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="Weights only load failed"):
        opt.load_checkpoint(bad)
    assert not marker.exists()
    assert_same_state_dict(opt.state_dict(), before)


# ----- metadata that is DCP's classes, built to hurt -------------------------------------------


def build_on_a_class() -> bytes:
    """A pickle that sets an attribute on DCP's Metadata class itself (process-wide)."""
    module = dcp_metadata.Metadata.__module__.encode()
    return b"c" + module + b"\nMetadata\nN}\x8c\x0bhacked_attr\x88s\x86b."  # slot state


def rewrite_metadata(path, change) -> None:
    metadata = pickle.loads((path / METADATA).read_bytes())
    change(metadata)
    (path / METADATA).write_bytes(pickle.dumps(metadata))


def huge_index(md) -> None:
    key = next(k for k, v in md.planner_data.items() if v[0] == "param_groups")
    md.planner_data[key] = ("param_groups", 10**9, "lr")


def huge_tensor(md) -> None:
    entry = next(v for v in md.state_dict_metadata.values() if hasattr(v, "size"))
    entry.size = torch.Size([10**6, 10**6])


def chunk_gap(md) -> None:
    """A chunk shrunk: a reader would keep uninitialised memory in the rows it no longer covers."""
    entry = next(v for v in md.state_dict_metadata.values() if len(getattr(v, "size", ())) == 2)
    chunk = entry.chunks[0]
    entry.chunks[0] = dcp_metadata.ChunkStorageMetadata(
        chunk.offsets, torch.Size([chunk.sizes[0] - 1, *chunk.sizes[1:]])
    )


def chunk_overlap(md) -> None:
    entry = next(v for v in md.state_dict_metadata.values() if len(getattr(v, "size", ())) == 2)
    entry.chunks.append(entry.chunks[0])


def escaping_path(md) -> None:
    for info in md.storage_data.values():
        info.relative_path = "../../../../etc/passwd"


@pytest.mark.parametrize(
    ("attack", "match"),
    [
        ("build on a class", "sets the state of a type"),
        ("huge list index", "small indices"),
        ("huge tensor", "larger than all the data files"),
        ("chunk gap", "do not tile it"),
        ("chunk overlap", "do not tile it"),
        ("path outside", "which the commit record does not cover"),
    ],
)
def test_metadata_built_to_hurt_is_refused(victim, attack, match):
    opt, tmp_path = victim
    path = tmp_path / "plain"
    if attack == "build on a class":
        (path / METADATA).write_bytes(build_on_a_class())
    else:
        change = {
            "huge list index": huge_index,
            "huge tensor": huge_tensor,
            "chunk gap": chunk_gap,
            "chunk overlap": chunk_overlap,
        }
        rewrite_metadata(path, change.get(attack, escaping_path))
    reseal(path)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_checkpoint(path)
    assert not hasattr(dcp_metadata.Metadata, "hacked_attr")
    assert_same_state_dict(opt.state_dict(), before)


def test_a_record_naming_a_file_outside_is_refused(victim):
    opt, tmp_path = victim
    path = tmp_path / "plain"
    record_path, record = record_of(path)
    name = next(iter(record["files"]))
    record["files"]["../outside.distcp"] = record["files"].pop(name)
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="commit record of .* is malformed"):
        opt.load_checkpoint(path)


# ----- the gateway ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["keyed", "keyless"])
def gateway(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gateway-{request.param}")
    gw = serve(
        "127.0.0.1",
        0,
        tokens=[TOKEN],
        checkpoint_dir=str(root),
        checkpoint_key=KEY if request.param == "keyed" else None,
    )
    # the token's own directory: a token's checkpoint paths live under it
    yield gw, root / token_scope(TOKEN), request.param == "keyed"
    gw.stop(1)


@pytest.mark.parametrize("resealed", [False, True])
def test_gateway_load_checkpoint_refuses_a_forged_metadata(gateway, resealed):
    gw, root, keyed = gateway
    model = make_model(sizes=SIZES)
    remote = shardopt.AdamW(
        model.parameters(), lr=1e-2, address=f"127.0.0.1:{gw.port}", token=TOKEN
    )
    train_step(model, remote, 0)
    name = f"victim-{uuid.uuid4().hex[:6]}"
    remote.save_checkpoint(name)
    checkpoint.verify(root / name, key=KEY if keyed else None)  # signed by a keyed gateway
    if keyed:
        with pytest.raises(ValueError, match="signed with another key"):
            checkpoint.verify(root / name, key=OTHER_KEY)
    train_step(model, remote, 1)
    before = remote.state_dict()
    marker = root / f"pwned-{name}"
    (root / name / METADATA).write_bytes(forged_metadata("open", marker))
    if resealed:
        reseal(root / name)
    match = "is not signed" if keyed and resealed else r"\.metadata"
    with pytest.raises(ValueError, match=match):
        remote.load_checkpoint(name)
    assert not marker.exists()
    assert_same_state_dict(remote.state_dict(), before)
    remote.close()


def test_keyed_gateway_loads_only_checkpoints_it_signed(gateway):
    """A keyed gateway refuses what it did not sign; a keyless one loads any intact checkpoint
    (checksums detect corruption, not forgery)."""
    gw, root, keyed = gateway
    model = make_model(sizes=SIZES)
    outsider = shardopt.AdamW(model.parameters(), lr=9.0, num_shards=1)
    train_step(model, outsider, 0)
    root.mkdir(exist_ok=True)
    outsider.save_checkpoint(root / "outsider-plain")
    outsider.save_checkpoint(root / "outsider-other-key", key=OTHER_KEY)
    outsider.close()
    remote = shardopt.AdamW(
        make_model(sizes=SIZES).parameters(), lr=1e-2, address=f"127.0.0.1:{gw.port}", token=TOKEN
    )
    for name, match in [
        ("outsider-plain", "is not signed"),
        ("outsider-other-key", "signed with another key"),
    ]:
        if keyed:
            with pytest.raises(ValueError, match=match):
                remote.load_checkpoint(name)
            assert not remote.state_dict()["state"]  # never stepped: still no state
        else:
            remote.load_checkpoint(name)
            assert remote.state_dict()["state"]  # the outsider's
    with pytest.raises(ValueError, match="gateway signs"):
        remote.load_checkpoint("outsider-plain", key=KEY)
    remote.close()


# ----- concurrent saves -------------------------------------------------------------------------


def concurrent_round(path, savers: dict, reader) -> dict:
    """Both savers save to ``path`` and ``reader`` loads from it, all released at once."""
    start = threading.Barrier(len(savers) + 1)
    outcome: dict = {}

    def save(name: str) -> None:
        start.wait()
        try:
            savers[name].save_checkpoint(path)
            outcome[name] = "saved"
        except shardopt.CheckpointInUseError as err:
            outcome[name] = err

    def load() -> None:
        start.wait()
        try:
            reader.load_checkpoint(path)
            outcome["load"] = reader.state_dict()
        except (FileNotFoundError, ValueError) as err:  # replaced while read: a clear error
            outcome["load"] = err

    threads = [threading.Thread(target=save, args=(n,)) for n in savers]
    threads.append(threading.Thread(target=load))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcome


def test_concurrent_saves_to_one_directory_never_mix(tmp_path):
    """Two optimizers save to one directory at once while a third loads from it, 12 rounds:
    each save commits whole or fails with CheckpointInUseError; every load that succeeds
    (during the saves or after) holds exactly one optimizer's state."""
    path = tmp_path / "shared"
    savers = {}
    for name, seed, lr in (("a", 0, 0.01), ("b", 1, 0.02)):
        model = make_model(seed, SIZES)
        opt = shardopt.AdamW(model.parameters(), num_shards=2, lr=lr)
        train_step(model, opt, seed)
        savers[name] = opt
    states = {name: opt.state_dict() for name, opt in savers.items()}
    assert not same_state_dict(states["a"], states["b"])
    reader = shardopt.AdamW(make_model(sizes=SIZES).parameters(), num_shards=1, lr=0.5)
    saved_both = busy = 0
    for _ in range(12):
        outcome = concurrent_round(path, savers, reader)
        saved = [n for n in savers if outcome[n] == "saved"]
        assert saved, outcome
        busy += len(saved) == 1
        saved_both += len(saved) == 2
        for n in savers:
            if n not in saved:
                assert "in progress" in str(outcome[n])
        during = outcome["load"]
        if isinstance(during, dict):
            assert same_state_dict(during, states["a"]) or same_state_dict(during, states["b"])
        else:
            assert "checkpoint" in str(during) or str(path) in str(during)
        reader.load_checkpoint(path)
        after = reader.state_dict()
        matches = [n for n in savers if same_state_dict(after, states[n])]
        assert len(matches) == 1 and (len(saved) == 2 or matches == saved)
        names = os.listdir(path)
        assert len([n for n in names if n.endswith(".distcp")]) == 2
        assert len([n for n in names if n.startswith(RECORD_PREFIX)]) == 1
        assert sorted(n for n in names if n.startswith(".")) == sorted(
            [METADATA, LOCK, next(n for n in names if n.startswith(RECORD_PREFIX))]
        )
    print(f"rounds with one save refused: {busy}, with both saved in turn: {saved_both}")
    for opt in (*savers.values(), reader):
        opt.close()


def test_a_save_in_another_process_excludes_and_its_death_frees_the_directory(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from shardopt.checkpoint.commit import SaveLock; "
            "lock = SaveLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        opt = shardopt.SGD(make_model(sizes=SIZES).parameters(), lr=0.1, momentum=0.9, num_shards=2)
        with pytest.raises(shardopt.CheckpointInUseError, match="in progress"):
            opt.save_checkpoint(path)
        assert os.listdir(path) == [LOCK]  # nothing written
        holder.kill()  # no clean-up: the kernel drops the lock with the process
        holder.wait(timeout=30)
        opt.save_checkpoint(path)
        checkpoint.verify(path)
        opt.close()
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.parametrize("which", [METADATA, "data file"])
def test_a_link_where_a_checkpoint_file_belongs_is_refused(victim, which):
    """Even to identical bytes: a link could point at anything the loader may read."""
    opt, tmp_path = victim
    path = tmp_path / "plain"
    name = METADATA if which == METADATA else next(path.glob("*.distcp")).name
    copy = tmp_path / "elsewhere"
    copy.write_bytes((path / name).read_bytes())
    (path / name).unlink()
    (path / name).symlink_to(copy)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="not a regular file"):
        opt.load_checkpoint(path)
    assert_same_state_dict(opt.state_dict(), before)
