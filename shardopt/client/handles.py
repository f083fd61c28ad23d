"""Typed handles on shards: one method per call a shard serves, each returning a Ray ref.

A :class:`ShardHandle` names one shard (its host actor and its key there) and has a method for
every call of :class:`~shardopt.actor.host.ShardCalls`, so a reader (and a tool) can follow a
step from the proxy into the shard. Callers ``ray_get`` the refs (:mod:`shardopt.client.runtime`).
Replication wraps handles (:class:`~shardopt.client.replication.MirroredHandle`) so that the
calls that change a shard reach its replica too.

Talks to: shard host actors (:class:`~shardopt.actor.host.ShardHost`,
:class:`~shardopt.actor.shard_group_host.GroupShardHost`) through Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardopt.checkpoint.integrity import Commit
from shardopt.core.buffers import PackedTree
from shardopt.core.records import ParamBlock, ParamUpdate, ShardExport, StepRequest


@dataclass(frozen=True)
class ShardHandle:
    """Shard ``index`` of an optimizer: ``key`` on the host actor ``host``."""

    host: Any
    key: str
    index: int

    # ----- stepping and parameters ----------------------------------------------------------

    def step(self, request: StepRequest) -> Any:
        return self.host.step.remote(self.key, request)

    def step_direct(self, request: StepRequest, grads: Any, transport: str) -> Any:
        """A step whose gradients (``grads``, a ref put with ``transport``) and parameters
        travel through Ray Direct Transport (:mod:`shardopt.client.transport`)."""
        call = self.host.step_direct.options(tensor_transport=transport)
        return call.remote(self.key, request, grads)

    def set_params(self, update: ParamUpdate) -> Any:
        return self.host.set_params.remote(self.key, update)

    def param_values(self) -> Any:
        return self.host.param_values.remote(self.key)

    def add_param_group(self, options: dict[str, Any], block: ParamBlock) -> Any:
        return self.host.add_param_group.remote(self.key, options, block)

    def run_vectors(self, program: list[tuple]) -> Any:
        return self.host.run_vectors.remote(self.key, program)

    def open_lane(self) -> Any:
        """A step lane to this shard (:mod:`shardopt.core.lane`; a ``ShardHost``'s only)."""
        return self.host.open_lane.remote(self.key)

    def open_net_lane(self) -> Any:
        """A network lane to this shard (:mod:`shardopt.core.net_lane`; a ``ShardHost``'s only)."""
        return self.host.open_net_lane.remote(self.key)

    # ----- optimizer state ------------------------------------------------------------------

    def state(self, param_ids: tuple[int, ...] | None = None) -> Any:
        return self.host.state.remote(self.key, param_ids)

    def pack_state(self, param_ids: tuple[int, ...] | None = None) -> Any:
        return self.host.pack_state.remote(self.key, param_ids)

    def state_chunk(self, token: str, start: int, stop: int) -> Any:
        return self.host.state_chunk.remote(self.key, token, start, stop)

    def drop_state(self, token: str) -> Any:
        return self.host.drop_state.remote(self.key, token)

    def state_in_shared_memory(self, param_ids: tuple[int, ...] | None = None) -> Any:
        return self.host.state_in_shared_memory.remote(self.key, param_ids)

    def set_param_state(self, param_id: int, packed: PackedTree) -> Any:
        return self.host.set_param_state.remote(self.key, param_id, packed)

    def clear_param_state(self, param_id: int) -> Any:
        return self.host.clear_param_state.remote(self.key, param_id)

    def prepare_load(
        self, token: str, group_options: tuple[dict[str, Any], ...], packed: PackedTree
    ) -> Any:
        return self.host.prepare_load.remote(self.key, token, group_options, packed)

    def prepare_load_from_checkpoint(
        self, token: str, group_options: tuple[dict[str, Any], ...], commit: Commit
    ) -> Any:
        return self.host.prepare_load_from_checkpoint.remote(self.key, token, group_options, commit)

    def commit_load(self, token: str) -> Any:
        return self.host.commit_load.remote(self.key, token)

    def abort_load(self, token: str) -> Any:
        return self.host.abort_load.remote(self.key, token)

    # ----- checkpoints ----------------------------------------------------------------------

    def save_plan(self, token: str, path: str, param_groups: list[dict] | None) -> Any:
        return self.host.save_plan.remote(self.key, token, path, param_groups)

    def save_write(self, token: str, plan: Any) -> Any:
        return self.host.save_write.remote(self.key, token, plan)

    def save_wait(self, token: str) -> Any:
        return self.host.save_wait.remote(self.key, token)

    def save_done(self, token: str) -> Any:
        return self.host.save_done.remote(self.key, token)

    # ----- moving a shard, inspection -------------------------------------------------------

    def export(self) -> Any:
        return self.host.export.remote(self.key)

    def restore(self, export: ShardExport | Any) -> Any:
        return self.host.restore.remote(self.key, export)

    def status(self) -> Any:
        return self.host.status.remote(self.key)

    def state_news(self, seen: tuple[int, int] | None = None) -> Any:
        """Which parameters have optimizer state on the shard (see ``StateNews``)."""
        return self.host.state_news.remote(self.key, seen)
