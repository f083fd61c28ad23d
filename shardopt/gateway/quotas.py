"""What a gateway holds, and what one token (one tenant) may hold of it.

:class:`Limits` is every bound a gateway enforces; each is a ``shardopt serve`` flag.
:class:`Ledger` keeps the accounts of memory, thread-safe, and refuses what would pass a bound
*before* anything is allocated (all sizes are declared up front on the wire):

- *resident* bytes: the parameters of open sessions (and of sessions being opened), per token
  and in all;
- *buffered* bytes: what streams in flight hold (an upload from the sizes its header declares,
  a download from what it is about to send), per session, per token and in all;
- sessions per token and in all;
- *transfer* bytes: the sessions' reusable transfer buffers, in all (a session that would
  pass the bound does without one; nothing is refused for it).

A token's resident and buffered bytes together stay under ``max_token_bytes``, which the
defaults keep below each gateway-wide bound, so one token never holds all of either.

Talks to nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from shardopt.core.errors import QuotaExceededError

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What one gateway accepts (``shardopt serve`` flags in brackets)."""

    max_session_bytes: int = 8 * GiB
    """Parameter bytes one session may declare [--max-session-gib]."""
    max_total_bytes: int = 32 * GiB
    """Parameter bytes of all sessions together [--max-total-gib]."""
    max_buffered_bytes: int = 32 * GiB
    """Bytes held by all streams in flight together [--max-buffered-gib]."""
    max_token_bytes: int = 24 * GiB
    """One token's parameter bytes plus its streams' bytes in flight [--max-token-gib]."""
    max_params: int = 100_000
    """Parameter tensors per session."""
    max_sessions: int = 1024
    """Open sessions in all [--max-sessions]."""
    max_sessions_per_token: int = 16
    """Open sessions per token [--max-sessions-per-token]."""
    max_calls_per_token: int = 16
    """Calls one token may have in flight (streams and unary calls alike: each holds a server
    thread; a sync group of N workers under one token needs N) [--max-calls-per-token]."""
    stream_idle_timeout_s: float = 30.0
    """A stream waiting this long for its client's next message (or for the client to take
    the next one) is cancelled [--stream-idle-timeout]."""
    stream_timeout_s: float = 900.0
    """A stream that has waited this long for its client in all is cancelled
    [--stream-timeout]."""
    session_idle_timeout_s: float | None = 3600.0
    """A session unused this long is closed and its shards released; None: never
    [--session-idle-timeout]."""
    max_shards: int | None = None
    """Shards per session; None: the cluster's GPUs, or its CPUs where it has none, when the
    gateway starts [--max-shards]."""
    idle_shard_hosts: int | None = None
    """Idle shard host processes kept for reuse after sessions close; None: one per node or
    GPU (what a session with the default shard count uses) [--idle-shard-hosts]."""
    max_world_size: int = 1024
    """The largest shard group a session may declare."""
    max_group_timeout_s: float = 600.0
    """The longest a sync group step may wait for the other workers (it holds a thread)."""
    max_lbfgs_history: int = 100
    """The longest LBFGS history a session may ask for (torch's default; each entry holds two
    vectors of the parameters' size on the shards)."""
    state_factor: int = 4
    """A loaded state dict may declare up to this many times its session's parameter bytes."""
    max_transfer_bytes: int = 8 * GiB
    """Transfer buffers of all sessions together: a session whose optimizer has no gradient
    buffer of its own for some parameter (one split across shards, a shard group member's)
    keeps one, shaped as its parameters, that its pushes receive those gradients into (no
    fresh memory per call); a session that would pass this bound receives into memory
    allocated per call instead (slower, never refused). A token's transfer buffers never pass
    its sessions' parameter bytes [--max-transfer-gib]."""

    def upload_budget(self, session_bytes: int) -> int:
        """The most one session's uploads in flight may declare together (its largest legal
        upload: a state dict)."""
        return self.state_factor * session_bytes + (1 << 20)


@dataclass
class _Account:
    sessions: int = 0
    resident: int = 0
    buffered: int = 0


class Hold:
    """Bytes held in a :class:`Ledger` until :meth:`release` (idempotent, thread-safe)."""

    def __init__(self, ledger: Ledger, principal: str, nbytes: int, session_id: str | None):
        self._ledger = ledger
        self._args: tuple[str, int, str | None] | None = (principal, nbytes, session_id)
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            args, self._args = self._args, None
        if args is not None:
            self._ledger._give_back(*args)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.3g} GiB"


class Ledger:
    """The gateway's accounts of sessions and bytes, per token and in all (thread-safe).

    Every method that adds checks every bound first and changes nothing when one would pass;
    the error is a :class:`~shardopt.core.errors.QuotaExceededError` (RESOURCE_EXHAUSTED).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._tokens: dict[str, _Account] = {}
        self._session_uploads: dict[str, int] = {}
        self._sessions = 0
        self._resident = 0
        self._buffered = 0
        self._transfer = 0

    def _account(self, principal: str) -> _Account:
        return self._tokens.setdefault(principal, _Account())

    def _check_token(self, account: _Account, more: int) -> None:
        held = account.resident + account.buffered
        if held + more > self.limits.max_token_bytes:
            raise QuotaExceededError(
                f"{more} more bytes would pass this token's quota of "
                f"{_gib(self.limits.max_token_bytes)} (it holds {held} bytes in sessions and "
                f"streams in flight)"
            )

    def _drop_if_empty(self, principal: str) -> None:
        account = self._tokens.get(principal)
        if account is not None and account == _Account():
            del self._tokens[principal]

    # ----- sessions -------------------------------------------------------------------------

    def open_session(self, principal: str, nbytes: int) -> None:
        """Counts a session being opened with ``nbytes`` of parameters.

        Raises:
            QuotaExceededError: over the token's or the gateway's sessions or bytes.
        """
        limits = self.limits
        with self._lock:
            account = self._account(principal)
            try:
                if account.sessions >= limits.max_sessions_per_token:
                    raise QuotaExceededError(
                        f"this token holds its quota of {limits.max_sessions_per_token} open "
                        f"sessions; close one first"
                    )
                if self._sessions >= limits.max_sessions:
                    raise QuotaExceededError(
                        f"this gateway holds its limit of {limits.max_sessions} sessions"
                    )
                self._check_resident(account, nbytes)
            except QuotaExceededError:
                self._drop_if_empty(principal)
                raise
            account.sessions += 1
            account.resident += nbytes
            self._sessions += 1
            self._resident += nbytes

    def resume_session(self, principal: str, nbytes: int) -> None:
        """Counts a session a restarted gateway resumed, without refusing it (it was admitted
        before the restart): the token's quotas hold its new sessions back until it is under
        them again."""
        with self._lock:
            account = self._account(principal)
            account.sessions += 1
            account.resident += nbytes
            self._sessions += 1
            self._resident += nbytes

    def grow_session(self, principal: str, nbytes: int) -> None:
        """Counts ``nbytes`` more parameters of an open session (a new param group).

        Raises:
            QuotaExceededError: over the token's or the gateway's bytes.
        """
        with self._lock:
            account = self._account(principal)
            self._check_resident(account, nbytes)
            account.resident += nbytes
            self._resident += nbytes

    def shrink_session(self, principal: str, nbytes: int) -> None:
        """Gives back what :meth:`grow_session` counted (the param group was refused)."""
        with self._lock:
            self._account(principal).resident -= nbytes
            self._resident -= nbytes
            self._drop_if_empty(principal)

    def close_session(self, principal: str, nbytes: int) -> None:
        """Gives back a session (closed, expired, or refused while opening)."""
        with self._lock:
            account = self._account(principal)
            account.sessions -= 1
            account.resident -= nbytes
            self._sessions -= 1
            self._resident -= nbytes
            self._drop_if_empty(principal)

    def _check_resident(self, account: _Account, nbytes: int) -> None:
        if self._resident + nbytes > self.limits.max_total_bytes:
            raise QuotaExceededError(
                f"{nbytes} more parameter bytes would pass this gateway's limit of "
                f"{_gib(self.limits.max_total_bytes)} (in use: {self._resident})"
            )
        self._check_token(account, nbytes)

    # ----- streams --------------------------------------------------------------------------

    def hold(self, principal: str, nbytes: int, session: tuple[str, int] | None = None) -> Hold:
        """Holds ``nbytes`` of buffers (a stream in flight, staged gradients) until released.

        Args:
            principal: whose buffers they are.
            nbytes: what the stream declares (or what is about to be sent).
            session: ``(session id, its parameter bytes)`` for uploads into a session: what
                is held for it stays within :meth:`Limits.upload_budget`.

        Returns:
            A :class:`Hold`; its ``release()`` gives the bytes back (once).

        Raises:
            QuotaExceededError: over the session's, the token's or the gateway's bound.
        """
        limits = self.limits
        with self._lock:
            account = self._account(principal)
            try:
                if session is not None:
                    session_id, session_bytes = session
                    budget = limits.upload_budget(session_bytes)
                    held = self._session_uploads.get(session_id, 0)
                    if held + nbytes > budget:
                        raise QuotaExceededError(
                            f"{nbytes} more bytes of uploads would pass this session's bound "
                            f"of {budget} bytes ({held} held)"
                        )
                if self._buffered + nbytes > limits.max_buffered_bytes:
                    raise QuotaExceededError(
                        f"{nbytes} more bytes in flight would pass this gateway's limit of "
                        f"{_gib(limits.max_buffered_bytes)}; try again later"
                    )
                self._check_token(account, nbytes)
            except QuotaExceededError:
                self._drop_if_empty(principal)
                raise
            account.buffered += nbytes
            self._buffered += nbytes
            if session is not None:
                uploads = self._session_uploads
                uploads[session[0]] = uploads.get(session[0], 0) + nbytes
        return Hold(self, principal, nbytes, session[0] if session else None)

    def _give_back(self, principal: str, nbytes: int, session_id: str | None) -> None:
        with self._lock:
            self._account(principal).buffered -= nbytes
            self._buffered -= nbytes
            if session_id is not None:
                left = self._session_uploads.pop(session_id, 0) - nbytes
                if left:
                    self._session_uploads[session_id] = left
            self._drop_if_empty(principal)

    @contextmanager
    def buffered(
        self, principal: str, nbytes: int, session: tuple[str, int] | None = None
    ) -> Iterator[None]:
        """:meth:`hold` for the length of a block."""
        held = self.hold(principal, nbytes, session)
        try:
            yield
        finally:
            held.release()

    # ----- transfer buffers ------------------------------------------------------------------

    def reserve_transfer(self, nbytes: int) -> bool:
        """Counts a session's transfer buffer of ``nbytes``; False (nothing counted) if it would
        pass ``Limits.max_transfer_bytes``."""
        with self._lock:
            if self._transfer + nbytes > self.limits.max_transfer_bytes:
                return False
            self._transfer += nbytes
            return True

    def release_transfer(self, nbytes: int) -> None:
        """Gives back what :meth:`reserve_transfer` counted."""
        with self._lock:
            self._transfer -= nbytes

    @property
    def transfer_bytes(self) -> int:
        """The bytes of every session's transfer buffer."""
        with self._lock:
            return self._transfer

    # ----- reading --------------------------------------------------------------------------

    def accounts(self) -> dict[str, dict[str, int]]:
        """Every token's usage (sessions, resident, buffered), by principal."""
        with self._lock:
            return {
                principal: {
                    "sessions": a.sessions,
                    "resident": a.resident,
                    "buffered": a.buffered,
                }
                for principal, a in self._tokens.items()
            }

    def usage(self, principal: str | None = None) -> dict[str, int]:
        """What a token holds (or, without one, the gateway): sessions, resident, buffered."""
        with self._lock:
            if principal is None:
                return {
                    "sessions": self._sessions,
                    "resident": self._resident,
                    "buffered": self._buffered,
                }
            account = self._tokens.get(principal, _Account())
            return {
                "sessions": account.sessions,
                "resident": account.resident,
                "buffered": account.buffered,
            }
