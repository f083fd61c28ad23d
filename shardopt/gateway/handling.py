"""How the servicer's methods end: malformed requests and exceptions as gRPC statuses.

:func:`handled` and :func:`handled_stream` wrap a servicer method (unary, or one that streams
its answers) so that any exception ends the call through the servicer's ``_abort`` with its
status from :data:`shardopt.core.errors.GRPC_STATUS` (:func:`abort`: with a message that names
no server path, and an incident number in the log for an unexpected one); :class:`Malformed` is
what a request protobuf could not parse becomes (INVALID_ARGUMENT, not INTERNAL).

Talks to: nothing but the servicer it wraps and gRPC's context.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pathlib
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shardopt.core import wire
from shardopt.core.errors import ERROR_TYPE_KEY, GRPC_STATUS

logger = logging.getLogger("shardopt.gateway.servicer")  # where these were always logged


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


def abort(
    context: grpc.ServicerContext, exc: BaseException, checkpoint_dir: pathlib.Path | str | None
) -> None:
    """Ends the call with ``exc``'s status and a message that names no server path (the
    checkpoint directory taken out); an unexpected error is logged under an incident number."""
    code = status_of(exc)
    if isinstance(exc, wire.LimitError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    if code == grpc.StatusCode.INTERNAL:
        incident = uuid.uuid4().hex[:12]
        logger.error("gateway: unexpected error (incident %s)", incident, exc_info=exc)
        message = f"internal error; the gateway's log has the details (incident {incident})"
    else:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        message = scrub(message, checkpoint_dir)
    context.set_trailing_metadata(((ERROR_TYPE_KEY, type(exc).__name__),))
    context.abort(code, message or type(exc).__name__)


def scrub(message: str, checkpoint_dir: pathlib.Path | str | None) -> str:
    """``message`` with the checkpoint directory's absolute path (or URL) taken out."""
    if checkpoint_dir is None:
        return message
    roots = [str(checkpoint_dir)]
    if isinstance(checkpoint_dir, str):  # a URL: file systems name it without scheme
        roots.append(checkpoint_dir.split("://", 1)[1])
    for root in map(re.escape, roots):
        message = re.sub(root + r"/[^/\s'\"]+/?", "", message)  # a token's own directory
        message = re.sub(root, "<checkpoint-dir>", message)
    return message


@contextlib.contextmanager
def _statuses(servicer: Any, request: Any, context: grpc.ServicerContext) -> Iterator[None]:
    """Refuses a malformed request, and maps what the body raises to a status."""
    try:
        if isinstance(request, Malformed):
            raise wire.WireError(f"malformed request: {request.error}")
        yield
    except grpc.RpcError:  # the call was cancelled (by its client or the watchdog)
        raise
    except Exception as exc:
        servicer._abort(context, exc)


def handled(method: Callable) -> Callable:
    """Maps a servicer method's exceptions to statuses."""

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with _statuses(self, request, context):
            return method(self, request, context)

    return unary


def handled_stream(method: Callable) -> Callable:
    """:func:`handled` for a method that streams its answers."""

    @functools.wraps(method)
    def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator:
        with _statuses(self, request, context):
            yield from method(self, request, context)

    return stream
