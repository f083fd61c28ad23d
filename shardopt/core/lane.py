"""A step lane: a Unix socket between a client and one shard on its node, for the step alone.

A step through Ray is a task submitted over gRPC, handed from the actor's receiving thread to
its executing thread, and an answer handed back the same way: about a millisecond, and several
thread wake-ups that on a busy machine each wait for a CPU. Where the shard is on the client's
node (its buffers are shared memory already) the client can instead send the step's small
request over a socket to a thread in the shard's process and block on the answer: one wake-up
each way.

:class:`LaneServer` runs in the shard's process: a thread that accepts exactly one connection on
a socket in a fresh private directory (``0700``), removes the socket and its directory at once,
checks the client's token (a random secret handed out through Ray) before it reads anything
else, then serves one request at a time with the function it was given. :class:`LaneClient` is
the client's end. Frames are a length and a pickle: both ends are processes of one Ray job on
one node (Ray pickles the same records between them), and the token keeps any other process of
the same user from speaking first. The client's end pickles requests with the ``dumps`` it is
given (the client's layer passes one that falls back to cloudpickle, as Ray does, for what a
user may put in a param group: a lambda). A lane that breaks raises :class:`LaneBroken`: the
caller sends the same request through Ray instead (steps carry ids, so a shard applies each
once).

Talks to nothing but sockets and the file system.
"""

from __future__ import annotations

import hmac
import logging
import os
import pickle
import secrets
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")

Dumps = Callable[[Any], bytes]
"""How a client's end pickles its requests (the client's layer may pass one that takes more
than plain pickle: :func:`shardopt.client.lanes.dump_request`)."""


def plain_dumps(request: Any) -> bytes:
    return pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)


TOKEN_BYTES = 32
ACCEPT_TIMEOUT_S = 120.0
"""How long a lane waits for its client to connect before it closes."""
MAX_FRAME_BYTES = 64 << 20
"""The largest frame either end reads (a step's request and answer are small)."""


class LaneBroken(OSError):
    """The lane is closed or broken: send the call through Ray instead."""


@dataclass(frozen=True)
class LaneAddress:
    """Where a shard's lane listens and the secret its client must present first."""

    path: str
    token: bytes


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fills ``view`` from the socket (no intermediate bytes objects).

    Raises:
        LaneBroken: the other end closed first.
    """
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise LaneBroken("the other end closed the lane")
        got += k


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """The next ``n`` bytes from the socket (see :func:`recv_into`)."""
    data = bytearray(n)
    recv_into(sock, memoryview(data))
    return bytes(data)


def end_sockets(conn: socket.socket | None, listener: socket.socket) -> None:
    """Shuts a lane's connection (if any: its peer's next call fails at once) and its
    listener; either may be closed already."""
    if conn is not None:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
    try:
        listener.close()
    except OSError:
        pass


def _read_frame(sock: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(read_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise LaneBroken(f"a lane frame of {length} bytes (at most {MAX_FRAME_BYTES})")
    return read_exactly(sock, length)


def _write_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def picklable_error(err: BaseException) -> BaseException:
    """``err`` if it survives a pickle round trip, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


class LaneServer:
    """The shard's end: serves ``serve(request) -> answer`` for one client, on its own thread.

    Args:
        serve: called with each request; its answer (or the exception it raised, which the
            client re-raises) goes back.
        name: names the thread.
    """

    def __init__(self, serve: Callable[[Any], Any], name: str = "shardopt-lane") -> None:
        self._serve = serve
        self._dir = tempfile.mkdtemp(prefix="shardopt-lane-")  # 0700: this user only
        path = os.path.join(self._dir, "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._listener.settimeout(ACCEPT_TIMEOUT_S)
        self._conn: socket.socket | None = None
        self._closed = False
        self.address = LaneAddress(path, secrets.token_bytes(TOKEN_BYTES))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _forget_path(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def _run(self) -> None:
        try:
            try:
                conn, _ = self._listener.accept()
            finally:
                self._listener.close()
                self._forget_path()
            self._conn = conn
            conn.settimeout(ACCEPT_TIMEOUT_S)
            if not hmac.compare_digest(read_exactly(conn, TOKEN_BYTES), self.address.token):
                logger.warning("a step lane refused a client with the wrong token")
                return
            conn.settimeout(None)
            while True:
                request = pickle.loads(_read_frame(conn))
                try:
                    answer = (True, self._serve(request))
                except Exception as err:  # the client raises it, as Ray would
                    answer = (False, picklable_error(err))
                _write_frame(conn, pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError) as err:  # the client went away, or the lane was closed
            if not self._closed:
                logger.debug("step lane ended: %s", err)
        finally:
            self.close()

    def close(self) -> None:
        """Ends the lane (the client's next call raises :class:`LaneBroken`)."""
        self._closed = True
        end_sockets(self._conn, self._listener)
        self._forget_path()


class LaneClient:
    """The client's end of a shard's lane: one call in flight at a time.

    Raises:
        LaneBroken: (from the constructor) the lane cannot be reached.
    """

    def __init__(self, address: LaneAddress, dumps: Dumps = plain_dumps) -> None:
        self._dumps = dumps
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(address.path)
            self._sock.sendall(address.token)
        except OSError as err:
            self._sock.close()
            raise LaneBroken(f"cannot reach the step lane at {address.path}: {err}") from err
        self.closed = False

    def fileno(self) -> int:
        """For ``select``: readable once the answer is in."""
        return self._sock.fileno()

    def send(self, request: Any) -> None:
        """Sends a request (:meth:`receive` gets its answer)."""
        if self.closed:
            raise LaneBroken("the lane is closed")
        try:
            _write_frame(self._sock, self._dumps(request))
        except OSError as err:
            self.close()
            raise LaneBroken(f"the step lane broke: {err}") from err

    def receive(self) -> Any:
        """The answer to the request sent last.

        Raises:
            LaneBroken: the lane broke (the shard may or may not have served the request).
            Exception: whatever the shard's call raised.
        """
        try:
            ok, answer = pickle.loads(_read_frame(self._sock))
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            self.close()
            raise LaneBroken(f"the step lane broke: {err}") from err
        if not ok:
            raise answer
        return answer

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
