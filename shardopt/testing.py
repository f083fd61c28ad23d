"""Failure injection and a local S3 server, for tests and benchmarks; the library calls neither.

Shard hosts are killed (:func:`kill`) or made to die at a chosen moment of a step
(:func:`inject_fault`) from outside: the fault is installed on the live actor through Ray's
``__ray_call__``, so the production step has no fault hooks. :class:`LocalS3` runs an
S3-compatible server (moto's) on loopback, for object-store checkpoints.

Talks to: shard host actors through Ray; a moto server in a child process, over HTTP on
127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import ray

FAULTS = ("before_step", "after_step")


def _exit_at_step(host: Any, key: str, when: str) -> None:
    """Runs inside a shard host: its process exits as shard ``key``'s next step arrives
    (``"before_step"``) or once it has applied it, before answering (``"after_step"``)."""
    shard = host._shards[key]
    step = shard.step

    def dying_step(request: Any) -> Any:
        if when == "before_step":
            os._exit(1)
        step(request)
        os._exit(1)

    shard.step = dying_step


def inject_fault(handle: Any, when: str) -> None:
    """Makes the host of the shard behind ``handle`` (a ShardHandle) die at its next step.

    Raises:
        ValueError: ``when`` is not one of :data:`FAULTS`.
    """
    if when not in FAULTS:
        raise ValueError(f"unknown fault {when!r} (one of {FAULTS})")
    ray.get(handle.host.__ray_call__.remote(_exit_at_step, handle.key, when))


def kill(host: Any, timeout_s: float = 60.0) -> None:
    """``ray.kill``, then waits until the actor is really gone (ray.kill lands asynchronously).

    Raises:
        AssertionError: the actor still answers after ``timeout_s``.
    """
    ray.kill(host)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(host.info.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.1)
    raise AssertionError("the actor survived ray.kill")


class LocalS3:
    """An S3-compatible server (moto's ``moto.server``) in a child process on 127.0.0.1.

    :attr:`env` is what a process needs to reach it with s3fs (``AWS_ENDPOINT_URL``, test
    credentials, a region, loopback exempt from any proxy): set it in the environment of every
    process that opens ``s3://`` URLs before that process starts; Ray's workers inherit the
    environment of the process that started Ray, so set it before ``ray.init``. The port is
    chosen when the object is made, so the environment can be set before the server starts.

    Example::

        with LocalS3() as s3:              # needs moto[server] and s3fs
            os.environ.update(s3.env)
            url = s3.bucket("ckpt")         # "s3://ckpt"
    """

    def __init__(self, port: int | None = None) -> None:
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        # a proxy the environment names never sees the requests to this server
        bypass = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
        bypass = ",".join(filter(None, [bypass, "127.0.0.1", "localhost"]))
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "shardopt-test",
            "AWS_SECRET_ACCESS_KEY": "shardopt-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": bypass,
            "no_proxy": bypass,
        }
        self._process: subprocess.Popen | None = None
        self._log: Any = None

    def start(self, timeout_s: float = 30.0) -> LocalS3:
        """Starts the server and waits until it answers.

        Raises:
            RuntimeError: moto or s3fs is not installed, or the server did not answer (its
                log's end is in the message).
        """
        for module, package in (("moto.server", "moto[server]"), ("s3fs", "s3fs")):
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:
                found = False
            if not found:
                raise RuntimeError(f"{package} is not installed (pip install '{package}')")
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with direct.open(self.endpoint, timeout=2):
                    return self
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                tail = self._log.read()[-2000:].decode(errors="replace")
                self.stop()
                raise RuntimeError(f"the S3 server on {self.endpoint} did not start: {tail}")
            time.sleep(0.1)

    def filesystem(self) -> Any:
        """An s3fs file system of this server (its own instance, listings not cached)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.env["AWS_ACCESS_KEY_ID"],
            secret=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": self.env["AWS_DEFAULT_REGION"]},
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def bucket(self, name: str) -> str:
        """Creates a bucket (if it does not exist) and returns its URL, ``s3://<name>``."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.call_s3("create_bucket", Bucket=name)  # us-east-1: no location constraint
        return f"s3://{name}"

    def stop(self) -> None:
        """Stops the server (its objects are gone)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
