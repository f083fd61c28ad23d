"""The Ray actors that hold shards, and the calls a shard serves through them.

:class:`ShardCalls` is every call a client makes on a shard, one method each, keyed by the
shard's key on its host (what :class:`~shardopt.client.handles.ShardHandle` calls).
:class:`ShardHost` holds the shards of the optimizers of one or more processes, pooled and
reused by :mod:`shardopt.client.runtime`; a shard group's
:class:`~shardopt.actor.shard_group_host.GroupShardHost` serves the same calls under its lock.
Both are plain classes, made remote where they are created (``ray.remote(ShardHost)``).

Talks to: the shards it holds (:class:`~shardopt.actor.shard.Shard`); Ray's metrics
(:mod:`shardopt.actor.metrics`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from shardopt.actor.metrics import observe
from shardopt.actor.shard import Shard
from shardopt.actor.threads import usable_cpus
from shardopt.core.buffers import PackedTree, to_numpy
from shardopt.core.lane import LaneAddress, LaneBroken, LaneServer
from shardopt.core.net_lane import NetLaneAddress, NetLaneServer
from shardopt.core.records import (
    ParamBlock,
    ParamUpdate,
    ShardExport,
    ShardSpec,
    ShardStatus,
    SharedBuffers,
    SharedTree,
    StateNews,
    StepRequest,
    StepResult,
)

if TYPE_CHECKING:  # (torch's DCP, imported by a shard's first checkpoint: see shard.py)
    from shardopt.checkpoint.integrity import Commit

NAMESPACE = "shardopt"
"""The Ray namespace of shardopt's named actors."""


def kill_actors(actors: list[Any]) -> None:
    """Kills actors (hosts of shards), ignoring the ones already gone and a cluster gone away."""
    import ray

    if not ray.is_initialized():  # the cluster is gone, and its actors with it
        return
    for actor in actors:
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass


def actor_device() -> torch.device:
    """CUDA when Ray gave this actor a GPU (and torch can see it), else CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPUs (whole or a fraction, from
    ``num_gpus`` or a placement bundle's ``GPU``), so its first GPU is ``cuda:0``; where Ray
    was told not to (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) it is the GPU's own index.
    """
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if gpu_ids and torch.cuda.is_available():
            index = 0
            if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "0") not in ("", "0"):
                index = int(gpu_ids[0]) if str(gpu_ids[0]).isdigit() else 0
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
            return device
    except Exception:  # outside an actor
        pass
    return torch.device("cpu")


def finished(shard: Shard) -> None:
    """Waits for the shard's GPU work (so that a step's time is the update's, not its launch)."""
    if shard.device.type == "cuda":
        torch.cuda.synchronize(shard.device)


def observe_step(shard: Shard, seconds: float) -> None:
    """Records a shard's update in ``shardopt_actor_step_seconds`` (Ray metrics)."""
    optimizer = type(shard.optimizer).__name__
    observe("step", seconds, optimizer=optimizer, shard=str(shard.shard_index))


class ShardCalls:
    """The calls of a shard held by a host actor, each naming the shard by its key."""

    def _using(self, key: str) -> contextlib.AbstractContextManager[Shard]:
        """The shard ``key``, for the length of one call."""
        raise NotImplementedError

    # ----- stepping and parameters ----------------------------------------------------------

    def step(self, key: str, request: StepRequest) -> StepResult:
        with self._using(key) as shard:
            start = time.perf_counter()
            result = shard.step(request)
            finished(shard)
            observe_step(shard, time.perf_counter() - start)
            return result

    def step_direct(
        self, key: str, request: StepRequest, grads: torch.Tensor | None
    ) -> tuple[StepResult, torch.Tensor]:
        """A step whose gradient buffer came as a tensor (through Ray Direct Transport, see
        :mod:`shardopt.client.transport`); answers with the result and a copy of the shard's
        flat parameter buffer on its device, for the client to fetch the same way. A copy, as
        RDT objects must not change after they are sent: the next step writes the buffer."""
        with self._using(key) as shard:
            if grads is not None and request.step_id > shard.status().last_step_id:
                shard.grad_buffer().copy_(grads)
            start = time.perf_counter()
            result = shard.step(replace(request, grads=None, return_params=False))
            finished(shard)
            observe_step(shard, time.perf_counter() - start)
            return result, shard.param_buffer().clone()

    def set_params(self, key: str, update: ParamUpdate) -> None:
        with self._using(key) as shard:
            shard.set_params(update)

    def param_values(self, key: str) -> Any:
        with self._using(key) as shard:
            return shard.param_values()

    def add_param_group(
        self, key: str, options: dict[str, Any], block: ParamBlock
    ) -> SharedBuffers | None:
        with self._using(key) as shard:
            return shard.add_param_group(options, block)

    def run_vectors(self, key: str, program: list[tuple]) -> list[Any]:
        with self._using(key) as shard:
            return shard.run_vectors(program)

    # ----- optimizer state ------------------------------------------------------------------

    def state(self, key: str, param_ids: tuple[int, ...] | None = None) -> PackedTree:
        with self._using(key) as shard:
            return shard.state(param_ids)

    def pack_state(self, key: str, param_ids: tuple[int, ...] | None = None) -> Any:
        with self._using(key) as shard:
            return shard.pack_state(param_ids)

    def state_chunk(self, key: str, token: str, start: int, stop: int) -> Any:
        with self._using(key) as shard:
            return shard.state_chunk(token, start, stop)

    def drop_state(self, key: str, token: str) -> None:
        with self._using(key) as shard:
            shard.drop_state(token)

    def state_in_shared_memory(
        self, key: str, param_ids: tuple[int, ...] | None = None
    ) -> SharedTree | PackedTree:
        with self._using(key) as shard:
            return shard.state_in_shared_memory(param_ids)

    def set_param_state(self, key: str, param_id: int, packed: PackedTree) -> None:
        with self._using(key) as shard:
            shard.set_param_state(param_id, packed)

    def clear_param_state(self, key: str, param_id: int) -> None:
        with self._using(key) as shard:
            shard.clear_param_state(param_id)

    def prepare_load(
        self, key: str, token: str, group_options: tuple[dict[str, Any], ...], packed: PackedTree
    ) -> Exception | None:
        with self._using(key) as shard:
            return shard.prepare_load(token, group_options, packed)

    def prepare_load_from_checkpoint(
        self, key: str, token: str, group_options: tuple[dict[str, Any], ...], commit: Commit
    ) -> tuple[Exception | None, tuple[int, ...]]:
        with self._using(key) as shard:
            return shard.prepare_load_from_checkpoint(token, group_options, commit)

    def commit_load(self, key: str, token: str) -> None:
        with self._using(key) as shard:
            shard.commit_load(token)

    def abort_load(self, key: str, token: str) -> None:
        with self._using(key) as shard:
            shard.abort_load(token)

    # ----- checkpoints ----------------------------------------------------------------------

    def save_plan(self, key: str, token: str, path: str, param_groups: list[dict] | None) -> Any:
        with self._using(key) as shard:
            return shard.save_plan(token, path, param_groups)

    def save_write(self, key: str, token: str, plan: Any) -> None:
        with self._using(key) as shard:
            shard.save_write(token, plan)

    def save_wait(self, key: str, token: str) -> Any:
        with self._using(key) as shard:
            return shard.save_wait(token)

    def save_done(self, key: str, token: str) -> bool:
        with self._using(key) as shard:
            return shard.save_done(token)

    # ----- moving a shard, inspection -------------------------------------------------------

    def export(self, key: str) -> ShardExport:
        with self._using(key) as shard:
            return shard.export()

    def restore(self, key: str, export: ShardExport) -> None:
        with self._using(key) as shard:
            shard.restore(export)

    def status(self, key: str) -> ShardStatus:
        with self._using(key) as shard:
            return shard.status()

    def state_news(self, key: str, seen: tuple[int, int] | None = None) -> StateNews:
        with self._using(key) as shard:
            return shard.state_ledger.news(seen)


class ShardHost(ShardCalls):
    """A Ray actor holding the shards of one or more optimizers, keyed by ``owner/index``.

    Hosts are pooled and reused by :mod:`shardopt.client.runtime`, so a new optimizer does not
    pay for a new worker process. Ray runs one call at a time on it, so the optimizers whose
    shards it holds take turns. A shard whose client is on this node may also be stepped through a
    step lane (:meth:`open_lane`), one whose client is on another node through a network lane
    (:meth:`open_net_lane`), each on the lane's thread: a lock keeps every call one at a time.
    """

    def __init__(self) -> None:
        self._shards: dict[str, Shard] = {}
        self._lanes: dict[str, LaneServer | NetLaneServer] = {}
        self._lock = threading.RLock()  # Ray's calls and the lanes' steps take turns
        self.device = actor_device()

    @contextlib.contextmanager
    def _using(self, key: str) -> Iterator[Shard]:
        with self._lock:
            try:
                shard = self._shards[key]
            except KeyError:
                raise KeyError(f"this shard host holds no shard {key!r}") from None
            yield shard

    def open_lane(self, key: str) -> LaneAddress | None:
        """Opens a step lane to shard ``key`` for a client on this node (see
        :mod:`shardopt.core.lane`); None where the shard's buffers are not shared memory."""
        with self._lock:
            if self._shards[key].shared_buffers() is None:
                return None
            self._close_lane(key)
            lane = self._lanes[key] = LaneServer(
                lambda request: self.step(key, request), name=f"shardopt-lane-{key}"
            )
            return lane.address

    def open_net_lane(self, key: str) -> NetLaneAddress | None:
        """Opens a network lane (:mod:`shardopt.core.net_lane`) to shard ``key`` for a client on
        another node: a step's gradients come over TCP straight into the shard's gradient
        buffer, and the answer carries the parameters inline, sent from the shard's own
        parameter buffer (no object store either way). None for a shard on a GPU or in shared
        memory (its client is on this node). The lane closes when the shard's buffers move
        (:meth:`add_param_group`; the client opens another); a step that finds them moved
        otherwise (:meth:`reattach`) is answered :class:`~shardopt.core.lane.LaneBroken`
        unapplied, and the client sends it through Ray."""
        import ray

        with self._lock:
            shard = self._shards[key]
            grads = shard.grad_buffer()
            if shard.shared_buffers() is not None or grads.device.type != "cpu":
                return None
            self._close_lane(key)

            def serve(request: Any, received: Any) -> tuple[StepResult, torch.Tensor]:
                if not isinstance(request, StepRequest):
                    raise TypeError(f"a step lane carries steps, not {type(request).__name__}")
                with self._using(key) as current:
                    if current.grad_buffer().data_ptr() != grads.data_ptr():  # moved meanwhile
                        raise LaneBroken(f"shard {key}: its buffers moved")  # sent through Ray
                    result = self.step(key, replace(request, grads=None, return_params=False))
                    return result, current.param_buffer()

            lane = self._lanes[key] = NetLaneServer(
                ray.util.get_node_ip_address(), shard.layout.nbytes, serve,
                name=f"shardopt-net-lane-{key}", into=to_numpy(grads),
            )  # fmt: skip
            return lane.address

    def add_param_group(
        self, key: str, options: dict[str, Any], block: ParamBlock
    ) -> SharedBuffers | None:
        with self._lock:
            if isinstance(self._lanes.get(key), NetLaneServer):  # its byte size changes
                self._close_lane(key)
            return super().add_param_group(key, options, block)

    def _close_lane(self, key: str) -> None:
        lane = self._lanes.pop(key, None)
        if lane is not None:
            lane.close()

    def create(
        self,
        key: str,
        shard_index: int,
        spec: ShardSpec,
        shared_memory: bool = False,
        num_threads: int | None = None,
    ) -> tuple[tuple[int, ...], SharedBuffers | None]:
        """Creates a shard (and sets this host's torch threads, when given).

        Returns:
            The ids its optimizer's constructor gave state to, and its shared buffers (if any).
        """
        if num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        shard = Shard(shard_index, spec, self.device, shared_memory)
        with self._lock:
            self._shards[key] = shard
        return shard.initial_state_ids(), shard.shared_buffers()

    def create_from(
        self, key: str, shard_index: int, export: ShardExport, num_threads: int | None = None
    ) -> tuple[int, ...]:
        """Creates a shard that continues an exported one (a replica, or a replacement)."""
        self.create(key, shard_index, export.spec, False, num_threads)
        shard = self._shards[key]
        shard.restore(export)
        return tuple(sorted(shard.status().state_ids))

    def reattach(
        self, key: str, shared_memory: bool
    ) -> tuple[tuple[int, ...], SharedBuffers | None, int]:
        """Hands a shard to a proxy in a new process (a restarted gateway's session): its
        buffers move to new shared-memory files (``shared_memory``) or into this process.

        Returns:
            The ids with optimizer state, the shared buffers (if any), the last step applied.
        """
        with self._using(key) as shard:
            buffers = shard.reshare(shared_memory)
            status = shard.status()
            return tuple(sorted(status.state_ids)), buffers, status.last_step_id

    def drop(self, key: str) -> None:
        with self._lock:
            self._close_lane(key)
            shard = self._shards.pop(key, None)
            if shard is not None:
                shard.close()

    def describe(self) -> list[dict[str, Any]]:
        """Every shard held here: its key, its optimizer's class and its status (for
        ``shardopt status``)."""
        return [
            {"key": key, "optimizer": type(s.optimizer).__name__, "status": s.status()}
            for key, s in sorted(self._shards.items())
        ]

    def info(self) -> dict[str, Any]:
        """The host's device, node, the GPUs Ray gave it, whether it has NIXL, its process id,
        the CPUs it can run on and the shards it holds."""
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {
            "device": str(self.device),
            "node_id": node_id,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
            "nixl": importlib.util.find_spec("nixl") is not None,
            "pid": os.getpid(),
            "cpus": usable_cpus(),
            "shards": sorted(self._shards),
        }
