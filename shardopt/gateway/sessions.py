"""The gateway's open sessions: whose each one is, when it was last used, closing and expiry.

A :class:`Session` is a :class:`~shardopt.client.optimizer.ShardedOptimizer` over the parameter
tensors the gateway holds for one client, with the gradients that client staged. The
:class:`SessionTable` finds a session for its own token only (another token's is "not found"),
counts the calls using each, closes a session unused for ``Limits.session_idle_timeout_s`` (from a
background thread), and gives every closed session's bytes back to the
:class:`~shardopt.gateway.quotas.Ledger`; closing a session releases its shards (their hosts return
to the bounded pool of :mod:`shardopt.client.runtime`).

Talks to: the sessions' optimizers (``close()``) and the ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from shardopt.client.optimizer import ShardedOptimizer
from shardopt.core.errors import ShardoptError
from shardopt.core.events import emit
from shardopt.gateway.admission import scope_of
from shardopt.gateway.quotas import Hold, Ledger
from shardopt.gateway.saves import BackgroundSaves

logger = logging.getLogger(__name__)


class SessionLock:
    """A session's lock, which counts its holds: :attr:`generation` is odd while a call holds
    it and changes with every hold, so a reader that works without it (a pull streaming the
    parameters) can tell whether anything may have changed them since it looked (a seqlock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0

    def __enter__(self) -> SessionLock:
        self._lock.acquire()
        self.generation += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.generation += 1
        self._lock.release()


@dataclass
class Session:
    """One client's optimizer, its parameters here, and the gradients it staged."""

    session_id: str
    principal: str
    optimizer: ShardedOptimizer
    params: list[torch.Tensor]
    names: list[str]
    nbytes: int
    lock: SessionLock = field(default_factory=SessionLock)
    """Held by every call that reads or changes the session, except a pull's stream."""
    grads_ready: bool = False
    staged: Hold | None = None
    """The ledger's hold on the staged gradients' bytes, until a step consumes them."""
    steps: int = 0
    closed: bool = False
    """Set (under ``lock``) once the session is closed: nothing may be staged or added."""
    active: int = 0
    """Calls using the session now (an idle session has none)."""
    last_used: float = field(default_factory=time.monotonic)
    opened: float = field(default_factory=time.monotonic)
    saves: BackgroundSaves = field(default_factory=BackgroundSaves)
    """Checkpoint saves in the background, committed by WaitCheckpoint or at close."""
    transfer: list[torch.Tensor] | None = None
    """Tensors shaped as ``params`` that pushes receive gradients into where the optimizer has
    no gradient buffer of its own for them, allocated on first use (see
    :meth:`claim_grad_targets`)."""
    transfer_user: object | None = None
    """Who uses the gradient targets now: an upload (until its gradients are stepped)."""
    transfer_bytes: int = 0
    """What ``transfer`` counts in the ledger."""
    staged_transfer: object | None = None
    """The claim of the staged gradients, if they are in the gradient targets."""
    recorded: bool = False
    """Whether a session store holds its record (a restarted gateway resumes it)."""
    record_kwargs: dict | None = None
    """What admission gave its optimizer (kept for its record)."""
    placements: list[int] = field(default_factory=list)
    """How many param groups each placement of its parameters placed (see
    :attr:`~shardopt.gateway.session_store.SessionRecord.placed`)."""
    refused: str | None = None
    """Why its steps are refused (an LBFGS step that a gateway's restart cut short)."""
    resend_next: bool = False
    """(A resumed sync group member) its next step may repeat one whose answer was lost."""

    def expected(self, indices: list[int] | None = None) -> list[tuple[torch.dtype, tuple]]:
        """(dtype, shape) of the parameters (all, or those at ``indices``)."""
        chosen = self.params if indices is None else [self.params[i] for i in indices]
        return [(p.dtype, tuple(p.shape)) for p in chosen]

    def check_open(self) -> None:
        """Raises KeyError (NOT_FOUND) if the session was closed (call with ``lock`` held)."""
        if self.closed:
            raise KeyError(f"no session {self.session_id!r} (closed while the call was running)")

    def unstage(self) -> None:
        """Drops the staged gradients (call with ``lock`` held)."""
        for p in self.params:
            p.grad = None
        self.grads_ready = False
        if self.staged is not None:
            self.staged.release()
            self.staged = None
        if self.staged_transfer is not None:
            self.release_transfer(self.staged_transfer)
            self.staged_transfer = None

    def check_vote(self) -> None:
        """Raises ShardoptError unless the session is a sync group member (only a member votes
        to skip a round: any other session skips a step by not sending it)."""
        group = self.optimizer.group
        if group is None or group.config.mode != "sync":
            raise ShardoptError(
                "only a sync shard group's member votes to skip a round: any other session "
                "skips a step by not sending it"
            )

    def vote_skip(self) -> None:
        """(Call with ``lock`` held, after :meth:`check_vote`) a sync group member's step whose
        client's GradScaler found an inf: the member steps as under a scaler that found one, so
        it votes to skip the group's round (it updates no shard) rather than leave the other
        members waiting."""
        optimizer: Any = self.optimizer  # GradScaler's attributes (see shardopt.core.amp)
        optimizer.grad_scale, optimizer.found_inf = None, torch.ones(())
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf

    # ----- the transfer buffer ---------------------------------------------------------------

    def claim_grad_targets(self, ledger: Ledger) -> tuple[object, list[torch.Tensor]] | None:
        """Where one push receives its gradients (call with ``lock`` held): a claim to give back
        with :meth:`release_transfer`, and per parameter the tensor to receive into. That is
        its place in its shard's gradient buffer where the optimizer has one for it (a
        parameter one shard holds whole; the shard's shared memory where it runs on this
        node), so the step's packing copies nothing; else its tensor of the session's transfer
        buffer (:meth:`claim_transfer`).

        None (the caller allocates as it goes) while gradients are staged or another push
        holds the targets (a push must not overwrite what a step may still read), or when a
        transfer buffer is needed and cannot be had.
        """
        if self.grads_ready or self.transfer_user is not None or self.closed:
            return None
        backend = self.optimizer.backend
        slots = [backend.grad_slot(i) for i in range(len(self.params))]
        if None not in slots:
            self.transfer_user = claim = object()
            return claim, slots
        claimed = self.claim_transfer(ledger)
        if claimed is None:
            return None
        claim, buffers = claimed
        return claim, [s if s is not None else b for s, b in zip(slots, buffers)]

    def claim_transfer(self, ledger: Ledger) -> tuple[object, list[torch.Tensor]] | None:
        """The session's transfer buffer for one upload (call with ``lock`` held): a claim to
        give back with :meth:`release_transfer` and tensors shaped as ``params``.

        Reusing the same memory spares each call the page faults of fresh memory (a large
        part of a transfer's cost). None (the caller allocates as it goes) when another call
        holds it, or a new one would pass the gateway's ``max_transfer_bytes``.
        """
        if self.transfer_user is not None or self.closed:
            return None
        shapes = [(p.dtype, p.shape) for p in self.params]
        if self.transfer is None or [(t.dtype, t.shape) for t in self.transfer] != shapes:
            self.drop_transfer(ledger)  # the parameters changed (a param group was added)
            if not ledger.reserve_transfer(self.nbytes):
                return None
            self.transfer = [torch.empty(p.shape, dtype=p.dtype) for p in self.params]
            self.transfer_bytes = self.nbytes
        self.transfer_user = claim = object()
        return claim, self.transfer

    def check_steppable(self) -> None:
        """Raises ShardoptError if the session's steps are refused (see :attr:`refused`), or
        while a push streams into the gradient targets (call with ``lock`` held): a step that
        packs gradients there now would mix the two."""
        if self.refused is not None:
            raise ShardoptError(self.refused)
        if self.transfer_user is not None and self.transfer_user is not self.staged_transfer:
            raise ShardoptError(
                "a PushGradients of this session is still streaming into its gradient buffers; "
                "step once it has ended"
            )

    def release_transfer(self, claim: object) -> None:
        """Gives back a claim of :meth:`claim_transfer` (a no-op for any other)."""
        if self.transfer_user is claim:
            self.transfer_user = None

    def drop_transfer(self, ledger: Ledger) -> None:
        """Frees the transfer buffer (call with ``lock`` held; it must not be claimed)."""
        if self.transfer is not None:
            self.transfer = None
            ledger.release_transfer(self.transfer_bytes)
            self.transfer_bytes = 0


class SessionTable:
    """Open sessions by id (thread-safe), each visible to its own token only.

    Args:
        ledger: where sessions' bytes are counted (given back as they close).
        idle_timeout_s: close sessions unused this long (None: never).
    """

    def __init__(self, ledger: Ledger, idle_timeout_s: float | None) -> None:
        self.ledger = ledger
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.on_close: Callable[[str], None] | None = None
        """Told each closed session's id (a session store drops its record)."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def add(self, session: Session) -> None:
        with self._lock:
            self._sessions[session.session_id] = session

    def snapshot(self, principal: str | None = None) -> list[Session]:
        """The open sessions (of ``principal`` only, if given), oldest first."""
        with self._lock:
            sessions = list(self._sessions.values())
        return [s for s in sessions if principal is None or s.principal == principal]

    @contextmanager
    def use(self, principal: str, session_id: str) -> Iterator[Session]:
        """``principal``'s session ``session_id``, counted as in use for the block.

        Raises:
            KeyError: no such session of this token (NOT_FOUND; another token's is the same).
        """
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.principal != principal:
                raise KeyError(f"no session {session_id!r} (closed, expired, or never opened)")
            session.active += 1
        try:
            yield session
        finally:
            with self._lock:
                session.active -= 1
                session.last_used = time.monotonic()

    def close(self, principal: str, session_id: str) -> bool:
        """Closes ``principal``'s session ``session_id``; returns whether it was open."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.principal != principal:
                return False
            del self._sessions[session_id]
        self._close(session)
        emit(logger, "session_closed", session=session_id, scope=scope_of(principal))
        return True

    def close_all(self) -> None:
        """Closes every session (graceful shutdown)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            self._close(session)

    def hand_over(self) -> None:
        """Lets go of every recorded session without closing it (a restarted gateway resumes
        them) and closes the others (graceful shutdown of a gateway with a session store)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            self._close(session, keep=session.recorded)

    def _close(self, session: Session, keep: bool = False) -> None:
        try:
            session.saves.finish_all()  # their directories' locks are this process's
            with session.lock:
                session.closed = True
                session.unstage()
                session.transfer_user = None  # a pull in flight sends what it copied
                session.drop_transfer(self.ledger)
                if keep:
                    session.optimizer.backend.detach()
                else:
                    session.optimizer.close()
        finally:
            self.ledger.close_session(session.principal, session.nbytes)
            if self.on_close is not None and not keep:
                self.on_close(session.session_id)

    # ----- expiry ---------------------------------------------------------------------------

    def expire_idle(self) -> int:
        """Closes the sessions unused for ``idle_timeout_s``; returns how many."""
        timeout = self.idle_timeout_s
        if timeout is None:
            return 0
        now = time.monotonic()
        with self._lock:
            expired = [
                s for s in self._sessions.values() if s.active == 0 and now - s.last_used > timeout
            ]
            for s in expired:
                del self._sessions[s.session_id]
        for s in expired:
            emit(
                logger, "session_expired", session=s.session_id, scope=scope_of(s.principal),
                idle_timeout_s=timeout,
            )  # fmt: skip
            try:
                self._close(s)
            except Exception:  # its shards are gone already: nothing left to release
                logger.exception("closing expired session %s", s.session_id)
        return len(expired)

    def start(self) -> None:
        """Starts closing idle sessions in the background (if they expire at all)."""
        timeout = self.idle_timeout_s
        if timeout is None or self._reaper is not None:
            return
        period = max(0.05, min(timeout / 4, 5.0))

        def reap() -> None:
            while not self._stop.wait(period):
                self.expire_idle()

        self._reaper = threading.Thread(target=reap, name="shardopt-session-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        """Stops the background expiry (sessions stay open; see :meth:`close_all`)."""
        self._stop.set()
