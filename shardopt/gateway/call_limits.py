"""Which calls a gateway runs at once, and how long a stream may wait for its client.

A gRPC server runs each call on a thread of one pool; a call that waits (for a slow client's
next message, or for the other workers of a sync group) keeps its thread. :class:`CallLimiter`,
a server interceptor, keeps the pool from being taken by anyone:

- a token has at most ``Limits.max_calls_per_token`` calls in flight, and all tokens together
  leave :data:`RESERVED_THREADS` of the pool free, so health checks and other tokens are always
  answered (a call over either bound is refused at once with RESOURCE_EXHAUSTED);
- the open streaming services (health ``Watch``, reflection) share :data:`OPEN_STREAM_SLOTS`;
  health ``Check`` is never limited (it returns at once);
- :class:`StreamWatchdog` cancels a stream that has waited ``stream_idle_timeout_s`` for its
  client's next message (or for the client to take the next answer), or
  ``stream_timeout_s`` in all. The time the server itself works (building an optimizer,
  stepping) does not count.

Talks to: grpc (the interceptor wraps the method handlers); :mod:`shardopt.gateway.auth` for who
calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shardopt.core.events import emit
from shardopt.gateway.auth import OPEN_SERVICES, bearer_token, principal_of
from shardopt.gateway.quotas import Limits

logger = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
OPEN_STREAM_SLOTS = 4
"""Health Watch and reflection streams in flight, for everyone together."""
RESERVED_THREADS = OPEN_STREAM_SLOTS + 4
"""Threads of the pool that token holders' calls never take: open streams, health checks,
and the refusals themselves."""
_OPEN = "<open services>"


class _Call:
    """One call in flight, as the watchdog sees it."""

    def __init__(self, context: grpc.ServicerContext, method: str, idle_limit: bool) -> None:
        self.context = context
        self.method = method
        self.idle_limit = idle_limit
        self.waiting_since: float | None = None
        self.waited = 0.0

    def wait(self) -> None:
        self.waiting_since = time.monotonic()

    def work(self) -> None:
        since, self.waiting_since = self.waiting_since, None
        if since is not None:
            self.waited += time.monotonic() - since


class StreamWatchdog:
    """Cancels streams that wait too long for their clients (one daemon thread)."""

    def __init__(self, idle_timeout_s: float, total_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s
        self._calls: set[_Call] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardopt-watchdog", daemon=True)
        self._thread.start()

    def add(self, call: _Call) -> None:
        with self._lock:
            self._calls.add(call)

    def remove(self, call: _Call) -> None:
        with self._lock:
            self._calls.discard(call)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout_s / 4, self.total_timeout_s / 4))
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                since = call.waiting_since
                if since is None:
                    continue
                waiting = now - since
                if call.idle_limit and waiting > self.idle_timeout_s:
                    why = f"no progress from the client for {waiting:.0f} s"
                elif call.waited + waiting > self.total_timeout_s:
                    why = f"waited {call.waited + waiting:.0f} s for the client in all"
                else:
                    continue
                emit(logger, "stream_cancelled", logging.WARNING, method=call.method, why=why)
                self.remove(call)
                call.context.cancel()


class CallLimiter(grpc.ServerInterceptor):
    """Bounds the calls in flight per token and in all, and watches their streams.

    Args:
        limits: the gateway's limits (calls per token, stream timeouts).
        max_workers: the server's thread pool size.

    Raises:
        ValueError: a pool too small to leave every token its share and keep
            :data:`RESERVED_THREADS` free.
    """

    def __init__(self, limits: Limits, max_workers: int) -> None:
        self._tenant_threads = max_workers - RESERVED_THREADS
        self._per_token = limits.max_calls_per_token
        if self._per_token < 1 or self._per_token >= self._tenant_threads:
            raise ValueError(
                f"max_workers={max_workers} must exceed max_calls_per_token="
                f"{self._per_token} + {RESERVED_THREADS} (threads kept for health checks and "
                f"other tokens)"
            )
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._tenant_calls = 0
        self.watchdog = StreamWatchdog(limits.stream_idle_timeout_s, limits.stream_timeout_s)

    def in_flight(self, principal: str) -> int:
        """Calls of ``principal`` in flight now."""
        with self._lock:
            return self._in_flight.get(principal, 0)

    def _acquire(self, key: str) -> str | None:
        """Takes a slot for ``key``; returns why not, or None."""
        with self._lock:
            held = self._in_flight.get(key, 0)
            if key == _OPEN:
                if held >= OPEN_STREAM_SLOTS:
                    return f"{OPEN_STREAM_SLOTS} health/reflection streams are open; try later"
            elif held >= self._per_token:
                return (
                    f"this token has {held} calls in flight, its limit "
                    f"(shardopt serve --max-calls-per-token)"
                )
            elif self._tenant_calls >= self._tenant_threads:
                return "the gateway is serving all the calls it can; try again later"
            else:
                self._tenant_calls += 1
            self._in_flight[key] = held + 1
            return None

    def _release(self, key: str) -> None:
        with self._lock:
            left = self._in_flight.get(key, 0) - 1
            if left > 0:
                self._in_flight[key] = left
            else:
                self._in_flight.pop(key, None)
            if key != _OPEN:
                self._tenant_calls -= 1

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method == HEALTH_CHECK:
            return handler
        if method.startswith(OPEN_SERVICES):
            key = _OPEN
        else:
            key = principal_of(bearer_token(handler_call_details.invocation_metadata))
        return _limited(handler, self, key, method, idle_limit=key != _OPEN)


def _limited(
    handler: Any, limiter: CallLimiter, key: str, method: str, idle_limit: bool
) -> grpc.RpcMethodHandler:
    """``handler`` with a slot held while it runs and its streams watched."""
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    behavior = (
        handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
    )

    def enter(context: grpc.ServicerContext) -> Callable[[], None]:
        refusal = limiter._acquire(key)
        if refusal is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                limiter._release(key)

        context.add_callback(release)
        return release

    def watched_requests(requests: Iterator[Any], call: _Call) -> Iterator[Any]:
        while True:
            call.wait()
            try:
                request = next(requests)
            except StopIteration:
                return
            finally:
                call.work()
            yield request

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        release = enter(context)
        call = _Call(context, method, idle_limit)
        limiter.watchdog.add(call)
        try:
            if streaming_in:
                request = watched_requests(iter(request), call)
            return behavior(request, context)
        finally:
            limiter.watchdog.remove(call)
            release()

    def run_streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        release = enter(context)
        call = _Call(context, method, idle_limit)
        limiter.watchdog.add(call)
        try:
            if streaming_in:
                request = watched_requests(iter(request), call)
            for answer in behavior(request, context):
                call.wait()  # until gRPC has sent it and asks for the next one
                yield answer
                call.work()
        finally:
            limiter.watchdog.remove(call)
            release()

    options = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if streaming_in and streaming_out:
        return grpc.stream_stream_rpc_method_handler(run_streaming, **options)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(run, **options)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(run_streaming, **options)
    return grpc.unary_unary_rpc_method_handler(run, **options)
