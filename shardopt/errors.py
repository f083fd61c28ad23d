"""shardopt's own error types.

Optimizer misuse raises what torch.optim raises (``ValueError``, ``TypeError``) with torch's
phrasing; the types here cover what only a distributed optimizer can get wrong. Later layers
(the gRPC gateway) map each to one status code.
"""

from __future__ import annotations


class ShardoptError(RuntimeError):
    """Base class of shardopt's own errors."""


class ShardUnavailableError(ShardoptError):
    """A shard actor died or cannot be reached, and the request could not be served."""


class OptimizerClosedError(ShardoptError):
    """The optimizer was closed; its shards are released."""


class GroupTimeoutError(ShardoptError, TimeoutError):
    """A synchronous group step waited longer than its timeout for the other workers."""


class PlacementError(ShardoptError):
    """The cluster cannot place the shards as asked; the message says what to change."""


class QuotaExceededError(ShardoptError, MemoryError):
    """A gateway refused a request over one of its limits (a token's quota, the gateway's bytes,
    a session's shards); nothing was allocated or changed."""


ERROR_TYPE_KEY = "shardopt-error-type"
"""gRPC trailing metadata naming the exception type, so the remote client raises the same."""

GRPC_STATUS: dict[type[BaseException], str] = {
    # most specific first: the gateway uses the first entry the exception is an instance of
    GroupTimeoutError: "DEADLINE_EXCEEDED",
    ShardUnavailableError: "UNAVAILABLE",
    OptimizerClosedError: "FAILED_PRECONDITION",
    PlacementError: "FAILED_PRECONDITION",
    QuotaExceededError: "RESOURCE_EXHAUSTED",
    PermissionError: "UNAUTHENTICATED",
    MemoryError: "RESOURCE_EXHAUSTED",
    FileNotFoundError: "NOT_FOUND",
    KeyError: "NOT_FOUND",
    ValueError: "INVALID_ARGUMENT",
    TypeError: "INVALID_ARGUMENT",
    IndexError: "INVALID_ARGUMENT",
    NotImplementedError: "UNIMPLEMENTED",
    ShardoptError: "FAILED_PRECONDITION",
}
"""The gRPC status code (by name) of each error, for the gateway; anything else is INTERNAL.
The exception's type name travels too, so the remote client raises the same type."""
