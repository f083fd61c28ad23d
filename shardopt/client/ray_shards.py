"""What every backend whose shards are Ray actors shares: state, loads, checkpoints, status.

:class:`RayShards` holds typed handles on the shards (:mod:`shardopt.client.handles`), a
:class:`~shardopt.client.shard_map.ShardMap` and a :class:`~shardopt.client.data_path.DataPath`,
and implements the state half of :class:`~shardopt.client.backend.Backend` over them: gathering
state one shard at a time, all-or-nothing loads (prepare on every shard, then commit or abort
on all), checkpoints (:mod:`shardopt.client.checkpoints`) and status. Its subclasses decide how
a step travels: :class:`~shardopt.client.local.LocalShards` (shards of this process) and
:class:`~shardopt.client.shard_group.ShardGroupMember` (a worker of a shard group).

Talks to: shards through :class:`~shardopt.client.handles.ShardHandle`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from shardopt.checkpoint.format import SaveHandle
from shardopt.checkpoint.integrity import Commit
from shardopt.client import checkpoints, state_file
from shardopt.client.backend import Backend, ParamSource
from shardopt.client.data_path import DataPath
from shardopt.client.handles import ShardHandle
from shardopt.client.runtime import ray_get
from shardopt.client.shard_map import ShardMap
from shardopt.core.buffers import pack_tree, tensors_in
from shardopt.core.mapped_files import page_out
from shardopt.core.param_groups import group_options, lay_out_state, place_state
from shardopt.core.records import ShardStatus


class RayShards(Backend):
    """A backend whose shards are Ray actors reached through typed handles."""

    _params: ParamSource
    handles: list[ShardHandle]
    shard_map: ShardMap
    data_path: DataPath
    transports: list[str] | None = None
    """Each shard's transport (:mod:`shardopt.client.transport`); None: shared memory where
    mapped, else the object store."""

    def handle(self, shard: int) -> ShardHandle:
        """The handle for calls that change shard ``shard`` (a replicated backend mirrors
        them)."""
        return self.handles[shard]

    # ----- optimizer state ------------------------------------------------------------------

    def state_parts(self, param_ids: tuple[int, ...] | None = None) -> Iterator[dict[int, Any]]:
        shard_map = self.shard_map
        if param_ids is None:
            shards = shard_map.live_shards()
        else:
            shards = sorted({s for pid in param_ids for s in shard_map.shards_of(pid)})
        pieces: dict[int, tuple[int, dict[str, Any]]] = {}  # split ids: pieces seen, state
        # One shard's state unpacked here while the next one packs: at most two in flight.
        request = self.data_path.request_state
        ref = request(self.handles[shards[0]], param_ids) if shards else None
        for i, shard in enumerate(shards):
            following = (
                request(self.handles[shards[i + 1]], param_ids) if i + 1 < len(shards) else None
            )
            part = self._receive_state(shard, ref, param_ids)
            for pid in [pid for pid in part if shard_map.is_split(pid)]:
                seen, merged = pieces.get(pid, (0, None))
                merged = shard_map.merge_piece(pid, shard, part.pop(pid), merged)
                if seen + 1 == len(shard_map.shards_of(pid)):  # its last piece: whole again
                    part[pid] = merged
                    pieces.pop(pid, None)
                else:
                    pieces[pid] = (seen + 1, merged)
            yield self._placed(part)
            ref = following
        if pieces:
            raise RuntimeError(
                f"parameters {sorted(pieces)} have optimizer state on some of their shards only"
            )

    def _placed(self, part: dict[int, Any]) -> dict[int, Any]:
        """State where and as torch keeps it: on the parameter's device (``step`` on the CPU
        unless its group is fused or capturable) and, for a parameter in another layout than
        the shards' (``channels_last``), in the parameter's (:func:`lay_out_state`), as
        ``torch.optim``'s own state of those parameters is."""
        params = self._params.flat()
        if all(params[pid].device.type == "cpu" and params[pid].is_contiguous() for pid in part):
            return part
        groups, group_of = self._params.groups, self._params.group_indices()
        placed = {}
        for pid, value in part.items():
            param = params[pid]
            if param.device.type != "cpu":
                value = place_state(value, param.device, groups[group_of[pid]])
            placed[pid] = value if param.is_contiguous() else lay_out_state(value, param)
        return placed

    def _receive_state(
        self, shard: int, request: Any, param_ids: tuple[int, ...] | None
    ) -> dict[int, Any]:
        """Shard ``shard``'s part of the state, asked for with ``request`` (a backend whose
        shards fail over asks the new one again when the shard was lost)."""
        return self.data_path.receive_state(request)

    def load_state(self, state: dict[int, dict[str, Any]], options: tuple[dict, ...]) -> None:
        per_shard: list[dict[int, Any]] = [{} for _ in range(self.num_shards)]
        params = self._params.flat()
        for pid, value in state.items():
            for shard, piece in self.shard_map.split_state(pid, value, params[pid].shape).items():
                per_shard[shard][pid] = piece
        token = uuid.uuid4().hex
        live = self.shard_map.live_shards()
        errors = []
        for s in live:  # one shard's part packed at a time: this process holds one at most
            packed = pack_tree(per_shard[s])
            page_out(tensors_in(per_shard[s]))  # read from a mapped file: give the pages back
            per_shard[s] = {}
            errors.append(ray_get(self.handle(s).prepare_load(token, options, packed)))
            del packed
            if errors[-1] is not None:
                break
        self._apply_prepared(token, live, errors)
        self.shard_map.set_state_order(state)

    def _apply_prepared(self, token: str, live: list[int], errors: list[Any]) -> None:
        """Phase two of an all-or-nothing load: commit on every shard, or abort on all."""
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            ray_get([self.handle(s).abort_load(token) for s in live])
            raise failure
        ray_get([self.handle(s).commit_load(token) for s in live])

    def stream_state_file(
        self, path: str, order: list[int], param_groups: list[dict[str, Any]]
    ) -> bool:
        if not all(p.is_contiguous() for p in self._params.flat()):
            return False  # its state is laid out as the parameter (see _placed): gathered
        state_file.save_state_file(path, self.shard_map, self.handles, order, param_groups)
        return True

    def set_param_state(self, pid: int, value: dict[str, Any]) -> None:
        shape = self._params.flat()[pid].shape
        pieces = self.shard_map.split_state(pid, value, shape)
        ray_get([self.handle(s).set_param_state(pid, pack_tree(v)) for s, v in pieces.items()])
        self.shard_map.note_state([pid])

    def clear_param_state(self, pid: int, options: tuple[dict, ...]) -> None:
        """Drops the state of ``pid`` on every shard holding a piece of it, and nothing else."""
        ray_get([self.handle(s).clear_param_state(pid) for s in self.shard_map.shards_of(pid)])
        self.shard_map.forget_state(pid)

    # ----- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, path: str, blocking: bool, key: bytes | None) -> SaveHandle:
        live = self.shard_map.live_shards()
        handle = checkpoints.save(
            path,
            self._params.packed_groups(id_type=str),  # string ids: DCP keeps string keys only
            blocking,
            key,
            shards=[self.handles[s] for s in live],
            parts=lambda: self.state_parts(),
        )
        handle.on_commit(self._checkpoint_taken())
        return handle

    def load_checkpoint(self, path: str, key: bytes | None) -> list[dict[str, Any]]:
        params = self._params
        commit, saved_groups = checkpoints.read_groups(
            path, params.groups, self.shard_map.num_params, key
        )
        options = tuple(group_options(g) for g in saved_groups)
        token = uuid.uuid4().hex
        live = self.shard_map.live_shards()
        answers = checkpoints.prepare_on_shards(
            commit, token, options, [self.handle(s) for s in live], self.shard_map
        )
        self._apply_prepared(token, live, [error for error, _ in answers])
        self.shard_map.set_state_order(sorted(pid for _, ids in answers for pid in ids))
        self._checkpoint_taken()(commit)
        return saved_groups

    def _checkpoint_taken(self) -> Callable[[Commit | None], None]:
        """What to do with a checkpoint of the state as of now, once committed (or loaded)."""
        return lambda commit: None

    def status(self) -> list[ShardStatus]:
        statuses = ray_get([h.status() for h in self.handles])
        transports = self.transports or [
            "shared_memory" if shared else "object_store" for shared in self.uses_shared_memory
        ]
        return [replace(st, transport=t) for st, t in zip(statuses, transports)]
