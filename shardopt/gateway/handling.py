"""How the servicer's methods end: malformed requests and exceptions as gRPC statuses.

:func:`handled` and :func:`handled_stream` wrap a servicer method (unary, or one that streams
its answers) so that any exception ends the call through the servicer's ``_abort`` with its
status from :data:`shardopt.core.errors.GRPC_STATUS`; :class:`Malformed` is what a request
protobuf could not parse becomes (INVALID_ARGUMENT, not INTERNAL).

Talks to: nothing but the servicer it wraps and gRPC's context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shardopt.core import wire
from shardopt.core.errors import GRPC_STATUS


class Malformed:
    """What a request that protobuf could not parse becomes (INVALID_ARGUMENT, not INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status an exception ends a call with (INTERNAL for an unexpected one)."""
    for kind, name in GRPC_STATUS.items():
        if isinstance(exc, kind):
            return getattr(grpc.StatusCode, name)
    return grpc.StatusCode.INTERNAL


def handled(method: Callable) -> Callable:
    """Maps a servicer method's exceptions to statuses."""

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                raise wire.WireError(f"malformed request: {request.error}")
            return method(self, request, context)
        except grpc.RpcError:  # the call was cancelled (by its client or the watchdog)
            raise
        except Exception as exc:
            self._abort(context, exc)

    return unary


def handled_stream(method: Callable) -> Callable:
    """:func:`handled` for a method that streams its answers."""

    @functools.wraps(method)
    def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator:
        try:
            if isinstance(request, Malformed):
                raise wire.WireError(f"malformed request: {request.error}")
            yield from method(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            self._abort(context, exc)

    return stream
