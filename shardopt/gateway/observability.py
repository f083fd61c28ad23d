"""What a gateway tells its operator: its calls and sessions as Prometheus metrics.

- :class:`MetricsInterceptor`, the outermost server interceptor, times every call from its
  start to its status (streams included) into ``shardopt_gateway_rpc_seconds{method, code}``
  and counts ``RESOURCE_EXHAUSTED`` answers in ``shardopt_gateway_quota_refusals_total{scope,
  method}``: refusals by authentication, call limits, quotas and the servicer alike;
- :func:`count_bytes` wraps a method's (de)serializer to count its message bytes in
  ``shardopt_gateway_bytes_total{method, direction}``;
- :class:`GatewayCollector` reads the live gateways' session tables and ledgers at scrape time:
  ``shardopt_gateway_sessions{scope}`` and ``shardopt_gateway_bytes_held{scope, kind}``
  (resident parameters, buffered streams).

Labels are bounded: the service's method names (anything else is ``other``), gRPC status
names, and token scopes (16 hex digits of a token's hash; ``anonymous`` without auth), of which
there are as many as the token file holds. No token, session id or path is ever a label.

Talks to: grpc (an interceptor); the metrics of :mod:`shardopt.core.metrics`; the gateways'
:class:`~shardopt.gateway.sessions.SessionTable` and :class:`~shardopt.gateway.quotas.Ledger`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client.core import GaugeMetricFamily

from shardopt.core.metrics import (
    GATEWAY_BYTES,
    GATEWAY_QUOTA_REFUSALS,
    GATEWAY_RPC_SECONDS,
    REGISTRY,
)
from shardopt.core.proto import pb
from shardopt.gateway.admission import scope_of
from shardopt.gateway.auth import bearer_token, principal_of

KNOWN_METHODS = frozenset(
    [m.name for m in pb.DESCRIPTOR.services_by_name["OptimizerService"].methods]
    + ["Check", "Watch", "ServerReflectionInfo"]
)
"""The ``method`` labels: the service's methods, health checks and reflection."""


def method_label(full_method: str) -> str:
    """``/shardopt.v1.OptimizerService/Step`` -> ``Step``; unknown methods -> ``other``."""
    name = (full_method or "").rpartition("/")[2]
    return name if name in KNOWN_METHODS else "other"


def count_bytes(function: Callable[[Any], Any], method: str, direction: str) -> Callable:
    """``function`` (a serializer or deserializer), counting the bytes it writes or reads."""
    counter = GATEWAY_BYTES.labels(method, direction)
    if direction == "in":

        def deserialize(data: bytes) -> Any:
            counter.inc(len(data))
            return function(data)

        return deserialize

    def serialize(message: Any) -> bytes:
        data = function(message)
        counter.inc(len(data))
        return data

    return serialize


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every call and counts refusals (see the module docstring). Put it first."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = method_label(handler_call_details.method)
        token = bearer_token(handler_call_details.invocation_metadata)
        return _timed(handler, method, lambda: scope_of(principal_of(token)))


def _record(method: str, scope: Callable[[], str], context: Any, start: float, failed: bool):
    code = context.code() if hasattr(context, "code") else None
    if code is None and failed:  # an exception, or a stream its client (or watchdog) cancelled
        active = context.is_active() if hasattr(context, "is_active") else True
        code = grpc.StatusCode.UNKNOWN if active else grpc.StatusCode.CANCELLED
    code = code or grpc.StatusCode.OK
    GATEWAY_RPC_SECONDS.labels(method, code.name).observe(time.perf_counter() - start)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        GATEWAY_QUOTA_REFUSALS.labels(scope(), method).inc()


def _timed(handler: Any, method: str, scope: Callable[[], str]) -> Any:
    """``handler`` with its call timed until its status."""
    behavior = (
        handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
    )

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        start, failed = time.perf_counter(), True
        try:
            answer = behavior(request, context)
            failed = False
            return answer
        finally:
            _record(method, scope, context, start, failed)

    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start, failed = time.perf_counter(), True
        try:
            yield from behavior(request, context)
            failed = False
        finally:
            _record(method, scope, context, start, failed)

    options = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    kind = (handler.request_streaming, handler.response_streaming)
    if kind == (True, True):
        return grpc.stream_stream_rpc_method_handler(streaming, **options)
    if kind == (True, False):
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    if kind == (False, True):
        return grpc.unary_stream_rpc_method_handler(streaming, **options)
    return grpc.unary_unary_rpc_method_handler(unary, **options)


# ----- sessions and bytes held, read when scraped ---------------------------------------------


class GatewayCollector:
    """Sessions and bytes held per token scope, summed over the live gateways of this process."""

    def __init__(self) -> None:
        self._servicers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, servicer: Any) -> None:
        with self._lock:
            self._servicers.add(servicer)

    def remove(self, servicer: Any) -> None:
        with self._lock:
            self._servicers.discard(servicer)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sessions = GaugeMetricFamily(
            "shardopt_gateway_sessions", "Open gateway sessions, by token scope", labels=["scope"]
        )
        held = GaugeMetricFamily(
            "shardopt_gateway_bytes_held",
            "Bytes a token holds in the gateway: its sessions' parameters (resident) and its "
            "streams in flight and staged gradients (buffered), by token scope",
            labels=["scope", "kind"],
        )
        counts: dict[str, int] = {}
        resident: dict[str, int] = {}
        buffered: dict[str, int] = {}
        with self._lock:
            servicers = list(self._servicers)
        for servicer in servicers:
            for session in servicer.sessions.snapshot():
                scope = scope_of(session.principal)
                counts[scope] = counts.get(scope, 0) + 1
            for principal, usage in servicer.ledger.accounts().items():
                scope = scope_of(principal)
                resident[scope] = resident.get(scope, 0) + usage["resident"]
                buffered[scope] = buffered.get(scope, 0) + usage["buffered"]
        for scope, count in sorted(counts.items()):
            sessions.add_metric([scope], count)
        for scope in sorted(set(resident) | set(buffered)):
            held.add_metric([scope, "resident"], resident.get(scope, 0))
            held.add_metric([scope, "buffered"], buffered.get(scope, 0))
        yield sessions
        yield held


COLLECTOR = GatewayCollector()
"""The one collector of this process's gateways (registered in shardopt's registry)."""
REGISTRY.register(COLLECTOR)
