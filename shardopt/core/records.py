"""The typed records that cross the process boundary between the proxy and its shard actors.

Each is a frozen dataclass; numpy buffers inside them travel through Ray's object store
out-of-band (zero-copy reads on the same node). Talks to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shardopt.core.amp import AmpScaling
from shardopt.core.buffers import FlatLayout, PackedTree


@dataclass(frozen=True)
class ParamBlock:
    """A run of parameters handed to a shard: their global ids, group indices and values.

    ``rows`` says, for a parameter split across shards, which rows this shard holds: ``(first
    row, the whole tensor's rows)``, or None for a whole tensor (an empty tuple: all whole).
    """

    param_ids: tuple[int, ...]
    group_indices: tuple[int, ...]
    layout: FlatLayout
    values: np.ndarray
    rows: tuple[tuple[int, int] | None, ...] = ()
    unfused_groups: tuple[int, ...] = ()
    """Groups with a tensor torch's fused kernels do not take (a complex one) on any shard: as
    in torch, where ``fused=True`` refuses such a group, they run torch's default path on every
    shard, also where this shard's part of them is all real."""


@dataclass(frozen=True)
class ShardSpec:
    """Everything a shard needs to build its optimizer: the class, its defaults, the groups."""

    optimizer_class: type
    defaults: dict[str, Any]
    group_options: tuple[dict[str, Any], ...]
    params: ParamBlock
    default_dtype: torch.dtype = torch.float32
    """The client's default dtype, which the optimizer runs under (:mod:`.default_dtype`)."""


@dataclass(frozen=True)
class SharedBuffers:
    """A shard's parameter and gradient buffers as files in shared memory (same node only).

    The proxy maps both files and unlinks them; from then on the memory lives as long as either
    side keeps its mapping, and nothing is left behind in ``/dev/shm`` if a process dies.
    """

    param_path: str
    grad_path: str
    nbytes: int


@dataclass(frozen=True)
class RankBuffers:
    """One worker's shared-memory files on a group shard of its node: its own gradient slot,
    the parameter buffer it reads (the shard's own, or in async mode with ``share_params`` one
    of its own), and in async mode the :class:`~shardopt.core.read_gate.ReadGate` it copies
    the shard's buffer under (None: it needs none)."""

    grad_path: str
    param_path: str | None
    nbytes: int
    gate_path: str | None = None


@dataclass(frozen=True)
class SharedTree:
    """A packed tree whose flat buffer is a shared-memory file (see :mod:`shardopt.core.shm`)."""

    skeleton: Any
    layout: FlatLayout
    path: str


@dataclass(frozen=True)
class SparseGrad:
    """A coalesced sparse COO gradient (SparseAdam's input)."""

    indices: np.ndarray
    values: np.ndarray

    def touched_rows(self) -> np.ndarray:
        """The distinct rows (dim-0 indices) the gradient touches, sorted."""
        return np.unique(self.indices[0]) if self.indices.size else np.zeros(0, np.int64)


@dataclass(frozen=True)
class StepRequest:
    """One optimizer step for one shard.

    ``grads`` is laid out as the shard's parameters (None: already written to the shard's shared
    gradient buffer); ``has_grad`` says which of its slots carry a
    dense gradient (the rest are skipped as torch skips ``grad=None``), ``sparse_grads`` holds
    sparse ones by local index. ``params_in`` carries parameters the user changed since the last
    step, which the shard adopts before updating. ``scaling`` is a GradScaler's scale and
    inf verdict, applied as torch applies them (:func:`shardopt.core.amp.step_scaled`).
    """

    step_id: int
    group_options: tuple[dict[str, Any], ...]
    grads: np.ndarray | None
    has_grad: tuple[bool, ...]
    sparse_grads: dict[int, SparseGrad]
    params_in: ParamUpdate | None = None
    return_params: bool = True  # False for a replica: the proxy needs only its acknowledgement
    scaling: AmpScaling | None = None  # a GradScaler's scale and verdict (see shardopt.core.amp)


@dataclass(frozen=True)
class ParamUpdate:
    """New values for some of a shard's parameters, by local index."""

    local_indices: tuple[int, ...]
    layout: FlatLayout
    values: np.ndarray


@dataclass(frozen=True)
class StepResult:
    """What a shard returns after a step: its parameters and who gained optimizer state.

    ``params`` is None for a shard with shared buffers: the proxy reads them there. It is also
    None after a step whose gradients were all sparse and changed only the rows they touched
    (``rows_only``, see :func:`shardopt.core.param_groups.sparse_step_keeps_other_rows`):
    ``rows`` then holds, by local index, the new values of just those rows (in sorted order of
    their distinct row indices), so a sparse step returns only what it changed.
    """

    step_id: int
    params: np.ndarray | None
    new_state_ids: tuple[int, ...]
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    rows_only: bool = False


@dataclass(frozen=True)
class ShardStatus:
    """What a shard reports about itself."""

    shard_index: int
    device: str
    fused: bool
    num_params: int
    param_bytes: int
    state_ids: tuple[int, ...]
    last_step_id: int
    transport: str = "object_store"
    """How tensors travel between the client and this shard: ``shared_memory``,
    ``network_lane``, ``object_store``, or a Ray Direct Transport (``cuda_ipc``, ``nixl``); set
    by the client."""


@dataclass(frozen=True)
class ShardExport:
    """Everything needed to rebuild a shard on another host: its spec (with the parameters'
    current values), its optimizer state by global id, and its last applied step."""

    spec: ShardSpec
    state: PackedTree
    last_step_id: int
    last_result: StepResult | None


@dataclass(frozen=True)
class StateNews:
    """What a reader of a shard's optimizer state must learn to know which of its parameters
    have state now, given what it saw last.

    ``mark`` stands for the shard's state as of now (pass it back as the ``seen`` of the next
    read): a number that changes whenever state is dropped or replaced (a load, a deletion),
    and the count of parameters with state, which a step only raises. ``ids`` are the global
    ids that gained state since ``seen`` (sorted, as torch meets them in a step), or, with
    ``whole``, every id with state on the shard in its order: the reader drops what it knew of
    this shard for it (state was dropped or replaced since, or it had seen nothing).
    """

    mark: tuple[int, int]
    ids: tuple[int, ...]
    whole: bool


@dataclass(frozen=True)
class PushRequest:
    """One worker's gradients for one shard of a group, computed on the shard's parameters at
    ``read_version`` (laid out as the shard's parameters, like :class:`StepRequest`; None:
    written to the rank's gradient slot in shared memory, see :class:`RankBuffers`)."""

    rank: int
    read_version: int
    group_options: tuple[dict[str, Any], ...]
    grads: np.ndarray | None
    has_grad: tuple[bool, ...]
    sparse_grads: dict[int, SparseGrad]
    resend: bool = False
    """(sync) this rank's push for ``read_version`` may have reached the shard already, its
    answer lost (a gateway restarted): answered from the round it was counted in, never
    applied twice nor refused as a second push."""
    push_id: int | None = None
    """(async) an id the rank gives this push (a gateway session's step id): a push with the id
    of the rank's last applied one (its answer was lost, it was sent again) is answered as that
    one was, with the shard's current parameters, and not applied again."""
    skip: bool = False
    """(sync) the rank's GradScaler found an inf or NaN in its gradients: it votes to skip the
    round, which then updates no shard (as one rank's inf skips a DDP step on every rank); it
    carries no gradients."""
    state_seen: tuple[int, int] | None = None
    """The ``mark`` of the last :class:`StateNews` the rank had of this shard (None: none): the
    answer tells it what changed since, whoever changed it (another rank's steps, loads or
    deletions)."""


@dataclass(frozen=True)
class ParamsAt:
    """A group shard's parameters (a Ray object ref to one flat buffer) at one version
    (``params`` None: read them in the shard's shared parameter buffer)."""

    version: int
    params: Any


@dataclass(frozen=True)
class PushResult:
    """A group shard's answer to a push.

    ``applied_version`` is the version the gradients were applied to (the shard then moved to
    ``applied_version + 1``), or None when they were not applied because they were computed on
    parameters more than ``max_staleness`` versions old. ``current`` holds the shard's
    parameters after the push, which the worker adopts.
    """

    shard_index: int
    rank: int
    read_version: int
    applied_version: int | None
    current: ParamsAt
    state_news: StateNews | None = None
    """Which parameters have state on the shard now, against the push's ``state_seen``."""
    participants: tuple[int, ...] = ()
    """(sync) the ranks whose gradients the round averaged."""
    skipped: bool = False
    """(sync) a rank voted to skip the round (:attr:`PushRequest.skip`): nothing was updated."""

    @property
    def staleness(self) -> int | None:
        """Versions between the parameters the gradients were computed on and the update."""
        if self.applied_version is None:
            return None
        return self.applied_version - self.read_version


@dataclass(frozen=True)
class GroupConfig:
    """How a shard group runs: its workers, its mode, its shards and where they are placed.

    ``world_size`` is None for an elastic group without a bound on its members; ``replicate``
    is the number of replicas of each shard, each applying every round (0: none)."""

    world_size: int | None
    mode: str
    max_staleness: int | None
    timeout_s: float
    num_shards: int
    placement: str | None
    shard_resources: tuple[tuple[str, float], ...]
    actor_options: tuple[tuple[str, Any], ...]
    elastic: bool = False
    heartbeat_timeout_s: float = 10.0
    replicate: int = 0


@dataclass(frozen=True)
class GroupSignature:
    """What every worker of a group must present identically to attach to it."""

    optimizer_class: str
    defaults: tuple[tuple[str, Any], ...]
    group_options: tuple[tuple[tuple[str, Any], ...], ...]
    group_sizes: tuple[int, ...]
    params: tuple[tuple[str, tuple[int, ...], str], ...]
    config: GroupConfig
    group_splits: tuple[bool, ...] = ()
    """Per param group: whether its tensors may be split across shards."""
    default_dtype: str = "float32"
    """The default dtype the group's shards run under (:mod:`.default_dtype`)."""


@dataclass(frozen=True)
class GroupMembership:
    """What a worker gets when it attaches: the group's shard hosts and whether it created it."""

    name: str
    rank: int
    created: bool
    hosts: tuple[Any, ...]
    keys: tuple[str, ...]
    node_ids: tuple[str, ...]
    coordinator: Any = None
    """An elastic group's :class:`~shardopt.actor.group_membership.GroupMembers` actor."""
    first_round: int = 0
    """(elastic) the round this worker was admitted to: the version it adopts."""
    replicas: tuple[tuple[Any, ...], ...] = ()
    """(replicate=k) each shard's replica hosts (k of them, fewer while one is rebuilt)."""
