"""shardopt's own error types.

Optimizer misuse raises what torch.optim raises (``ValueError``, ``TypeError``) with torch's
phrasing; the types here cover what only a distributed optimizer can get wrong. Later layers
(the gRPC gateway) map each to one status code.

Talks to nothing.
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


class PartialStepError(ShardoptError):
    """A step failed on some shards after others had applied it; the message says which and
    how to get back to one consistent state.

    Attributes:
        step_id: the step.
        applied: the shards that applied it.
        failed: the shards that raised (the first one's error is the ``__cause__``).
    """

    def __init__(
        self, message: str, *, step_id: int = -1, applied: list[int] = (), failed: list[int] = ()
    ) -> None:
        super().__init__(message)
        self.step_id = step_id
        self.applied = list(applied)
        self.failed = list(failed)


class PlacementError(ShardoptError):
    """The cluster cannot place the shards as asked; the message says what to change."""


class CheckpointInUseError(ShardoptError):
    """Another save to the same checkpoint directory is in progress; nothing was written."""


class PullConflictError(ShardoptError):
    """A gateway's parameters changed (a step, a load) while they were being pulled, so what
    was sent is not one state; nothing was changed, and pulling again gets the new state."""


class QuotaExceededError(ShardoptError, MemoryError):
    """A gateway refused a request over one of its limits (a token's quota, the gateway's bytes,
    a session's shards); nothing was allocated or changed."""


class AccessDeniedError(ShardoptError, PermissionError):
    """A gateway caller asked for what its token may not see or do (another tenant's sessions,
    or an operator's token calling a tenant's method)."""


ERROR_TYPE_KEY = "shardopt-error-type"
"""gRPC trailing metadata naming the exception type, so the remote client raises the same."""

GRPC_STATUS: dict[type[BaseException], str] = {
    # most specific first: the gateway uses the first entry the exception is an instance of
    GroupTimeoutError: "DEADLINE_EXCEEDED",
    ShardUnavailableError: "UNAVAILABLE",
    OptimizerClosedError: "FAILED_PRECONDITION",
    PartialStepError: "ABORTED",
    PlacementError: "FAILED_PRECONDITION",
    CheckpointInUseError: "ABORTED",
    PullConflictError: "ABORTED",
    QuotaExceededError: "RESOURCE_EXHAUSTED",
    AccessDeniedError: "PERMISSION_DENIED",
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
