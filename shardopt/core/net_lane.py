"""A network lane: a TCP connection between a group worker (or a plain optimizer's client) and one
shard on another node, carrying the step's data itself (gradients in, parameters back inline in
the answer).

A worker whose shard is on another node otherwise goes through Ray's object store at every
step: a ``ray.put`` of its gradients, a fetch across raylets, a Ray task, then the parameters as
a ref inside the answer (another put and fetch). A network lane streams the bytes instead, as
DDP's gloo does: the worker sends a fixed binary header, a small metadata frame and the
gradient bytes straight from its packed buffer; the shard receives them with ``recv_into``
straight into a receive buffer allocated once for that rank (a plain shard's: its own gradient
buffer), and answers with a header, the answer's metadata and the parameter bytes sent from the
shard's own memory, which the worker receives with ``recv_into`` into a buffer allocated once.

:class:`NetLaneServer` runs in the shard's process: a thread that listens on the node's address
(as Ray reports it), on an ephemeral port, accepts exactly one connection within
:data:`~shardopt.core.lane.ACCEPT_TIMEOUT_S`, reads the client's 32-byte token (a random secret
handed out through Ray) and compares it in constant time before it reads anything else: a wrong
token closes the connection and the lane, and nothing is served. After the token, every frame is
bounded: the header's metadata length is at most :data:`~shardopt.core.lane.MAX_FRAME_BYTES`
and its payload length must equal the shard's byte size, or the lane closes. The metadata is a
pickle (as on the Unix lane, and as Ray itself pickles the same records between these
processes): the token, delivered through Ray, puts the peer in the trust domain of Ray's own
traffic (SECURITY.md). :class:`NetLaneClient` is the worker's end; a lane that breaks raises
:class:`~shardopt.core.lane.LaneBroken` and the caller sends the same request through Ray.

Talks to nothing but sockets.
"""

from __future__ import annotations

import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardopt.core.lane import (
    ACCEPT_TIMEOUT_S,
    MAX_FRAME_BYTES,
    TOKEN_BYTES,
    Dumps,
    LaneBroken,
    end_sockets,
    picklable_error,
    plain_dumps,
    read_exactly,
    recv_into,
)

logger = logging.getLogger(__name__)

MAGIC = b"SOL1"
HEADER = struct.Struct("!4sQQ")
"""Every frame's header: the magic, the metadata's length, the payload's length."""
CONNECT_TIMEOUT_S = 10.0
"""How long a client waits to connect."""

Serve = Callable[[Any, np.ndarray], tuple[Any, Any]]
"""``serve(request, payload) -> (answer, parameters)``: the request's metadata, the payload
received in the lane's buffer; the answer's metadata and the bytes to send after it (a uint8
array of the lane's byte size, or None)."""


@dataclass(frozen=True)
class NetLaneAddress:
    """Where a shard's network lane listens, the secret its client presents first, and how many
    bytes every payload has (the shard's byte size)."""

    host: str
    port: int
    token: bytes
    nbytes: int


def _read_header(sock: socket.socket, nbytes: int, payload_optional: bool) -> tuple[int, int]:
    """The next frame's (metadata length, payload length), checked against the bounds."""
    magic, meta_len, payload_len = HEADER.unpack(read_exactly(sock, HEADER.size))
    if magic != MAGIC:
        raise LaneBroken("not a network lane frame")
    if meta_len > MAX_FRAME_BYTES:
        raise LaneBroken(f"a lane frame of {meta_len} bytes (at most {MAX_FRAME_BYTES})")
    if payload_len != nbytes and not (payload_optional and payload_len == 0):
        raise LaneBroken(f"a payload of {payload_len} bytes on a lane of {nbytes}")
    return meta_len, payload_len


def _bytes_view(payload: Any) -> memoryview:
    """A flat byte view of ``payload`` (a uint8 numpy array or CPU tensor), without a copy."""
    if hasattr(payload, "numpy"):
        payload = payload.numpy()
    return memoryview(np.ascontiguousarray(payload).reshape(-1).view(np.uint8))


class NetLaneServer:
    """The shard's end of a network lane: serves one client's requests, on its own thread.

    Args:
        bind: the address to listen on (the node's, as Ray reports it).
        nbytes: the shard's byte size: every request's and answer's payload has exactly these.
        serve: see :data:`Serve`; an exception it raises goes back to the client, which raises
            it.
        name: names the thread.
        into: where the payloads are received (``nbytes`` uint8, e.g. a shard's gradient
            buffer); by default a buffer of the lane's own.
    """

    def __init__(
        self,
        bind: str,
        nbytes: int,
        serve: Serve,
        name: str = "shardopt-net-lane",
        into: np.ndarray | None = None,
    ):
        self._serve = serve
        self._nbytes = nbytes
        if into is None:
            into = np.empty(nbytes, dtype=np.uint8)
        elif into.dtype != np.uint8 or into.shape != (nbytes,):
            raise ValueError(
                f"a lane of {nbytes} bytes receives into as many uint8, not {into.dtype} "
                f"{into.shape}"
            )
        self._buffer = into  # the payloads land here
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((bind, 0))
        self._listener.listen(1)
        self._listener.settimeout(ACCEPT_TIMEOUT_S)
        self._conn: socket.socket | None = None
        self._closed = False
        port = self._listener.getsockname()[1]
        self.address = NetLaneAddress(bind, port, secrets.token_bytes(TOKEN_BYTES), nbytes)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            try:
                conn, _ = self._listener.accept()
            finally:
                self._listener.close()
            self._conn = conn
            if self._closed:
                return
            conn.settimeout(ACCEPT_TIMEOUT_S)
            if not hmac.compare_digest(read_exactly(conn, TOKEN_BYTES), self.address.token):
                logger.warning("a network lane refused a client with the wrong token")
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            view = memoryview(self._buffer)
            while True:
                meta_len, _ = _read_header(conn, self._nbytes, payload_optional=False)
                meta = read_exactly(conn, meta_len)
                recv_into(conn, view)
                self._answer(conn, pickle.loads(meta))
        except (OSError, EOFError, pickle.UnpicklingError) as err:  # gone, closed, or refused
            if not self._closed:
                logger.debug("network lane ended: %s", err)
        finally:
            self.close()

    def _answer(self, conn: socket.socket, request: Any) -> None:
        try:
            answer, params = self._serve(request, self._buffer)
            ok = True
        except Exception as err:  # the client raises it, as Ray would
            ok, answer, params = False, picklable_error(err), None
        meta = pickle.dumps((ok, answer), protocol=pickle.HIGHEST_PROTOCOL)
        view = None if params is None else _bytes_view(params)
        if view is not None and view.nbytes != self._nbytes:
            raise LaneBroken(f"an answer of {view.nbytes} bytes on a lane of {self._nbytes}")
        size = 0 if view is None else view.nbytes
        conn.sendall(HEADER.pack(MAGIC, len(meta), size) + meta)
        if view is not None:
            conn.sendall(view)

    def close(self) -> None:
        """Ends the lane (the client's next call raises :class:`LaneBroken`)."""
        self._closed = True
        end_sockets(self._conn, self._listener)


class NetLaneClient:
    """The worker's end of a shard's network lane: one request in flight at a time. The
    parameters of the last answer are in :attr:`params` (allocated once).

    Raises:
        LaneBroken: (from the constructor) the lane cannot be reached.
    """

    def __init__(self, address: NetLaneAddress, dumps: Dumps = plain_dumps) -> None:
        self._dumps = dumps
        self.nbytes = address.nbytes
        self.params = np.empty(address.nbytes, dtype=np.uint8)
        self.has_params = False
        try:
            self._sock = socket.create_connection(
                (address.host, address.port), timeout=CONNECT_TIMEOUT_S
            )
        except OSError as err:
            raise LaneBroken(f"cannot reach the network lane at {address.host}: {err}") from err
        try:
            self._sock.settimeout(None)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.sendall(address.token)
        except OSError as err:
            self._sock.close()
            raise LaneBroken(f"the network lane broke: {err}") from err
        self.closed = False

    def fileno(self) -> int:
        """For ``select``: readable once the answer is coming."""
        return self._sock.fileno()

    def send(self, request: Any, payload: Any) -> None:
        """Sends a request's metadata and its payload (``nbytes`` bytes: a uint8 numpy array or
        CPU tensor, sent from its memory)."""
        if self.closed:
            raise LaneBroken("the lane is closed")
        view = _bytes_view(payload)
        if view.nbytes != self.nbytes:
            raise ValueError(f"a payload of {view.nbytes} bytes on a lane of {self.nbytes}")
        meta = self._dumps(request)
        try:
            self._sock.sendall(HEADER.pack(MAGIC, len(meta), view.nbytes) + meta)
            self._sock.sendall(view)
        except OSError as err:
            self.close()
            raise LaneBroken(f"the network lane broke: {err}") from err

    def receive(self) -> Any:
        """The answer to the request sent last; its parameters (if it has any:
        :attr:`has_params`) are in :attr:`params`.

        Raises:
            LaneBroken: the lane broke (the shard may or may not have served the request).
            Exception: whatever the shard's call raised.
        """
        try:
            meta_len, payload_len = _read_header(self._sock, self.nbytes, payload_optional=True)
            meta = read_exactly(self._sock, meta_len)
            if payload_len:
                recv_into(self._sock, memoryview(self.params))
            ok, answer = pickle.loads(meta)
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            self.close()
            raise LaneBroken(f"the network lane broke: {err}") from err
        self.has_params = bool(payload_len)
        if not ok:
            raise answer
        return answer

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
