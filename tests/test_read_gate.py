"""The read gate between an async group shard and the workers copying its parameters
(:mod:`shardopt.core.read_gate`), across real processes: a reader in another process holds the
writer off, a reader that dies holding it lets go, and the version travels with the buffer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shardopt.core.read_gate import ReadGate

READER = textwrap.dedent(
    """
    import sys, time
    from shardopt.core.read_gate import ReadGate
    gate = ReadGate.open(sys.argv[1])
    with gate.reading() as version:
        print(version, flush=True)
        time.sleep(float(sys.argv[2]))
    print("let go", flush=True)
    """
)


def _reader(path: str, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", READER, path, str(hold_s)], stdout=subprocess.PIPE, text=True
    )


def test_a_reader_in_another_process_holds_the_writer_off_and_reads_the_version():
    gate = ReadGate.create(version=7)
    reader = _reader(gate.link(), hold_s=1.5)
    try:
        assert reader.stdout.readline().strip() == "7"  # it holds the gate now
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="held it for more than 0.2 s"):
            with gate.writing(timeout_s=0.2):
                pytest.fail("the writer got in while a reader copied")
        assert 0.2 <= time.monotonic() - start < 1.0
        with gate.writing(timeout_s=30.0):  # waits for the reader to let go
            assert reader.stdout.readline().strip() == "let go"
            gate.set_version(8)
        assert reader.wait(timeout=30) == 0
    finally:
        reader.kill()
        reader.wait()
    with gate.reading() as version:  # the writer's own process can read too
        assert version == 8
    gate.close()


def test_a_reader_that_dies_holding_the_gate_lets_the_writer_in():
    gate = ReadGate.create()
    reader = _reader(gate.link(), hold_s=600)
    try:
        assert reader.stdout.readline().strip() == "0"
        with pytest.raises(TimeoutError):
            with gate.writing(timeout_s=0.1):
                pass
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait(timeout=30)
        with gate.writing(timeout_s=10.0):
            gate.set_version(1)
    finally:
        reader.kill()
        reader.wait()
    gate.close()


def test_nested_writes_lock_once_and_misuse_is_refused(tmp_path):
    gate = ReadGate.create()
    reader = ReadGate.open(gate.link())
    with gate.writing(timeout_s=1.0):
        with gate.writing(timeout_s=1.0):  # (the host's calls nest under its reentrant lock)
            gate.set_version(3)
        gate.set_version(4)  # the inner block did not let go of the lock
    with reader.reading() as version:
        assert version == 4
    with pytest.raises(RuntimeError, match="inside writing"):
        gate.set_version(5)
    with pytest.raises(ValueError, match="only the writer"):
        reader.link()
    name = gate.link()
    ReadGate.open(name).close()
    with pytest.raises(FileNotFoundError, match="opened already"):
        ReadGate.open(name)
    with pytest.raises(FileNotFoundError):
        ReadGate.open(str(tmp_path / "never-made"))
    path = gate._path
    reader.close()
    gate.close()
    gate.close()  # (once is enough)
    assert not os.path.exists(path)

    def ours() -> set[str]:
        return {f for f in os.listdir("/dev/shm") if f.startswith(f"shardopt-{os.getpid()}-")}

    fds, files = len(os.listdir("/proc/self/fd")), ours()
    for _ in range(50):  # ends dropped without close() let go of their descriptors and file
        dropped = ReadGate.create()
        ReadGate.open(dropped.link())
        del dropped
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert ours() <= files
