"""Bearer-token authentication for the gateway, and who a caller is.

A token file holds one token per line (blank lines and ``#`` comments ignored). Every call
must carry ``authorization: Bearer <token>`` metadata matching one of them, compared in
constant time; health checks and reflection are open. A caller's *principal* is a hash of its
token: sessions, group names and checkpoint directories are scoped by it, so one client's token
never reaches another client's session, group or checkpoint. Tokens that are short, repetitive
or still the placeholders of an example file are refused when a gateway starts. Operators' tokens
(a separate file) may only read the gateway's state.

Talks to: grpc (a server interceptor).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable
from typing import Any

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods anyone may call (load balancers and tools need them without a token)."""
OPERATOR_METHODS = frozenset({"ListSessions"})
"""The methods an operator's token may call (``shardopt serve --operator-token-file``)."""
ANONYMOUS = "anonymous"


MIN_TOKEN_LENGTH = 16
MIN_DISTINCT_CHARACTERS = 8
PLACEHOLDERS = (
    "replace-me", "replace_me", "replaceme", "change-me", "change_me", "changeme",
    "placeholder", "example", "your-token", "your_token", "yourtoken", "secret-here", "<", ">",
)  # fmt: skip
"""Words of example files' tokens (``deploy/env.example``): a token holding one is refused."""


def weak_token_reason(token: str) -> str | None:
    """Why ``token`` must not be accepted (a placeholder, short, repetitive), or None."""
    lowered = token.lower()
    for word in PLACEHOLDERS:
        if word in lowered:
            return f"it looks like a placeholder (it contains {word!r}): generate a real one"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"it has {len(token)} characters (at least {MIN_TOKEN_LENGTH})"
    if len(set(token)) < MIN_DISTINCT_CHARACTERS:
        return f"it has fewer than {MIN_DISTINCT_CHARACTERS} distinct characters"
    if any(c.isspace() for c in token):
        return "it contains white space"
    return None


def check_tokens(tokens: list[str], where: str = "tokens") -> None:
    """Refuses a token list that is empty or holds a weak token (see :func:`weak_token_reason`).

    Raises:
        ValueError: saying which token (by position, never its value) and why.
    """
    if not tokens:
        raise ValueError(f"{where}: no tokens")
    for i, token in enumerate(tokens):
        reason = weak_token_reason(token)
        if reason is not None:
            raise ValueError(
                f"{where}: token {i + 1} is refused: {reason}. Make one with: python -c "
                f"'import secrets; print(secrets.token_urlsafe(32))'"
            )


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The tokens of a token file.

    Raises:
        ValueError: the file holds no token, or a weak one (:func:`check_tokens`).
    """
    with open(path, encoding="utf-8") as f:
        tokens = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    check_tokens(tokens, str(path))
    return tokens


def bearer_token(metadata: Any) -> str | None:
    """The bearer token of a call's metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def principal_of(token: str | None) -> str:
    """Who a token is: a hash (the token itself is never kept or logged)."""
    if token is None:
        return ANONYMOUS
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without a valid bearer token, except open services.

    An operator's token is valid only for :data:`OPERATOR_METHODS` (PERMISSION_DENIED for the
    others: an operator reads the gateway's state, it holds no sessions).
    """

    def __init__(self, tokens: list[str], operator_tokens: Iterable[str] = ()) -> None:
        self._tokens = [t.encode() for t in tokens]
        self._operators = [t.encode() for t in operator_tokens]

    @staticmethod
    def _matches(token: str | None, known: list[bytes]) -> bool:
        if token is None:
            return False
        given = token.encode()
        matched = False
        for candidate in known:  # no early exit: the time does not depend on which matched
            matched |= hmac.compare_digest(given, candidate)
        return matched

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if self._matches(token, self._tokens):
            return continuation(handler_call_details)
        if self._matches(token, self._operators):
            if method.rpartition("/")[2] in OPERATOR_METHODS:
                return continuation(handler_call_details)
            return _refusal(
                continuation(handler_call_details),
                grpc.StatusCode.PERMISSION_DENIED,
                "an operator's token may only read the gateway's state (ListSessions)",
            )
        return _refusal(
            continuation(handler_call_details),
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token",
        )


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as ``handler`` that aborts with ``code``."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
