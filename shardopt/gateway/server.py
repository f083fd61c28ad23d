"""The gRPC gateway: shardopt's optimizer service for clients outside the Ray cluster.

:func:`serve` wires the servicer (:class:`shardopt.gateway.servicer.OptimizerGateway`) into a gRPC
server with health checking, reflection, token auth (:mod:`shardopt.gateway.auth`), call limits and
stream timeouts (:mod:`shardopt.gateway.call_limits`), TLS and message-size limits, and bounds the
shard host processes the gateway keeps idle; :meth:`Gateway.stop` shuts down gracefully
(NOT_SERVING, drain, stop). Requests that protobuf cannot parse become INVALID_ARGUMENT, not
INTERNAL.

With ``metrics_port`` it also serves Prometheus text (:mod:`shardopt.core.metrics`, the calls and
sessions of :mod:`shardopt.gateway.observability`) over HTTP.

Talks to: Ray (:func:`shardopt.client.runtime.ensure_ray`, the shard host pool); clients over gRPC;
scrapers over HTTP.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardopt.core import chunk_codec, wire
from shardopt.core.events import emit
from shardopt.core.metrics import start_http_server
from shardopt.core.proto import SERVICE_NAME, pb
from shardopt.gateway.admission import OPTIMIZERS, ShardSettings
from shardopt.gateway.auth import TokenAuthInterceptor, check_tokens, principal_of
from shardopt.gateway.call_limits import CallLimiter
from shardopt.gateway.handling import Malformed
from shardopt.gateway.observability import COLLECTOR, MetricsInterceptor, count_bytes
from shardopt.gateway.quotas import Limits
from shardopt.gateway.resume import StoreLink
from shardopt.gateway.servicer import OptimizerGateway

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZERS", "Gateway", "Limits", "OptimizerGateway", "serve"]


def _parser(message_class: Any) -> Callable[[bytes], Any]:
    if chunk_codec.carries_chunks(message_class):  # chunks read without copying their bytes
        return chunk_codec.parser(message_class, Malformed)

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as err:
            return Malformed(err)

    return parse


def _method_handlers(servicer: OptimizerGateway) -> grpc.GenericRpcHandler:
    """The service's handlers, with parsers that turn unparseable bytes into INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["OptimizerService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=count_bytes(_parser(request_class), method.name, "in"),
            # streams may send pre-encoded chunks
            response_serializer=count_bytes(chunk_codec.serialize, method.name, "out"),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class Gateway:
    """A running gateway: its port, and a graceful :meth:`stop`."""

    def __init__(
        self,
        server: grpc.Server,
        servicer: OptimizerGateway,
        health_servicer: Any,
        port: int,
        limiter: CallLimiter,
        restore_idle_hosts: Callable[[], None],
        metrics_server: Any = None,
        metrics_port: int | None = None,
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.port = port
        self.limiter = limiter
        self._restore_idle_hosts = restore_idle_hosts
        self._metrics_server = metrics_server
        self.metrics_port = metrics_port
        """Where ``/metrics`` is served (None: not served)."""

    def stop(self, grace: float = 10.0) -> None:
        """Health NOT_SERVING, then in-flight calls get ``grace`` seconds, then sessions close."""
        emit(logger, "gateway_stopping", port=self.port, sessions=len(self.servicer.sessions))
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.servicer.stop()
        self.limiter.watchdog.stop()
        self.servicer.close_all()
        COLLECTOR.remove(self.servicer)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._restore_idle_hosts()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _bind(add_port: Callable[[], int]) -> int:
    """The port ``add_port`` bound, or 0 where it could not (gRPC raises or returns 0)."""
    try:
        return add_port()
    except RuntimeError:  # "Failed to bind to address ..."
        return 0


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tokens: list[str] | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_key: bytes | None = None,
    limits: Limits | None = None,
    max_workers: int = 64,
    placement: str | None = None,
    shard_resources: dict[str, float] | None = None,
    operator_tokens: list[str] | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    session_store: str | None = None,
) -> Gateway:
    """Starts the gateway (Ray must be reachable: :func:`shardopt.client.runtime.ensure_ray`).

    Args:
        host, port: where to listen (port 0: any free port, see ``Gateway.port``).
        tokens: accepted bearer tokens (see :func:`shardopt.gateway.auth.check_tokens`); None serves
            without authentication.
        tls_cert, tls_key: PEM files for TLS; without them the port is plaintext.
        checkpoint_dir: where each token's Save/LoadCheckpoint directory lives (None: refused):
            a directory every Ray node mounts, or an object store URL such as
            ``s3://bucket/prefix`` (credentials from this process's and the nodes' environment).
        checkpoint_key: HMAC key (:func:`shardopt.checkpoint.integrity.read_key`) that signs
            every checkpoint saved; LoadCheckpoint then loads only checkpoints signed with it.
            None: checkpoints are checksummed, not signed, and any intact one loads.
        limits: limits and quotas (defaults: :class:`~shardopt.gateway.quotas.Limits`).
        max_workers: threads serving calls (sync group steps hold one each while waiting);
            more than ``limits.max_calls_per_token`` plus
            :data:`~shardopt.gateway.call_limits.RESERVED_THREADS`.
        placement, shard_resources: Ray placement strategy and per-shard resources of shard
            groups' shards (the operator's choice; clients cannot set them).
        operator_tokens: bearer tokens of operators: they may call ``ListSessions`` for every
            tenant's sessions (and nothing else); none of them may also be a tenant's token.
        metrics_port: serve Prometheus text at ``http://metrics_host:metrics_port/metrics``
            (0: any free port, see ``Gateway.metrics_port``; None: no metrics server).
        metrics_host: where the metrics server listens (default: ``host``).
        session_store: keep sessions in the Ray cluster under this name, so that a gateway
            started again with it on the same cluster resumes them
            (:mod:`shardopt.gateway.session_store`); None: sessions end with this process.

    Returns:
        The running :class:`Gateway`.

    Raises:
        ValueError: a placeholder or short token, inconsistent limits or placement, or a
            checkpoint URL of an unknown protocol.
        ImportError: the file system package of the checkpoint URL is not installed.
    """
    from shardopt.client.runtime import default_num_shards, ensure_ray, host_pool

    limits = limits or Limits()
    if tokens is not None:
        check_tokens(tokens)
    if operator_tokens:
        check_tokens(operator_tokens, "operator tokens")
        if tokens is None:
            raise ValueError("operator tokens need tenant tokens (a gateway without --no-auth)")
        if set(operator_tokens) & set(tokens):
            raise ValueError("a token cannot be both a tenant's and an operator's")
    shards = ShardSettings(placement, dict(shard_resources or {}))
    limiter = CallLimiter(limits, max_workers)
    ensure_ray()
    store = None
    if session_store is not None:
        store = StoreLink(session_store, limits.session_idle_timeout_s)
        host_pool.set_starter(store.start_host)
    servicer = OptimizerGateway(
        limits, checkpoint_dir, shards, checkpoint_key,
        operators=[principal_of(t) for t in operator_tokens or ()], store=store,
    )  # fmt: skip
    idle = limits.idle_shard_hosts
    previous_idle = host_pool.set_max_idle(default_num_shards() if idle is None else idle)
    auth = [TokenAuthInterceptor(tokens, operator_tokens or ())] if tokens else []
    interceptors = [MetricsInterceptor(), *auth, limiter]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shardopt-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", wire.MESSAGE_LIMIT),
            ("grpc.max_send_message_length", wire.MESSAGE_LIMIT),
            # gRPC binds with SO_REUSEPORT by default: another process of this user (a Ray
            # worker's gRPC server, or anyone's) could share the port and take tenants' calls
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((_method_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    metrics_server = None
    try:
        if metrics_port is not None:  # first: a gRPC port bound by a server never started
            # stays bound (gRPC lets it go only after start and stop)
            metrics_server, metrics_port = start_http_server(metrics_port, metrics_host or host)
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise ValueError("TLS needs both a certificate and a key")
            credentials = grpc.ssl_server_credentials(
                [(pathlib.Path(tls_key).read_bytes(), pathlib.Path(tls_cert).read_bytes())]
            )
            bound = _bind(lambda: server.add_secure_port(address, credentials))
        else:
            bound = _bind(lambda: server.add_insecure_port(address))
        if bound == 0:
            raise OSError(f"cannot listen on {address} (in use, or not this host's)")
        # once the ports are this gateway's (a gateway that cannot listen must not take the
        # store's sessions over) and before serving (no client sees its session missing)
        resumed = servicer.resume()
    except BaseException:  # the pool as it was: this process's optimizers keep their hosts
        server.stop(0)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        host_pool.set_max_idle(previous_idle)
        host_pool.set_starter(None)
        raise
    server.start()
    servicer.start()
    COLLECTOR.add(servicer)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if not tokens:
        logger.warning("gateway on %s:%d serves WITHOUT authentication", host, bound)
    if checkpoint_dir and checkpoint_key is None:
        logger.warning(
            "gateway checkpoints are checksummed but not signed (no --checkpoint-key-file): "
            "LoadCheckpoint loads any intact checkpoint under %s",
            checkpoint_dir,
        )
    emit(
        logger, "gateway_started", host=host, port=bound, auth=bool(tokens),
        operators=len(operator_tokens or ()), metrics_port=metrics_port, resumed=resumed,
    )  # fmt: skip
    return Gateway(
        server,
        servicer,
        health_servicer,
        bound,
        limiter,
        lambda: (host_pool.set_max_idle(previous_idle), host_pool.set_starter(None)),
        metrics_server,
        metrics_port,
    )
