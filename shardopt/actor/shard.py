"""One shard: the master copy of some parameters and a real torch optimizer over them.

A :class:`Shard` is a plain class (unit tests call it in-process); the Ray actors that hold
shards are :class:`~shardopt.actor.host.ShardHost` and a shard group's
:class:`~shardopt.actor.shard_group_host.GroupShardHost`. The shard writes no optimizer math: it
owns a genuine ``optimizer_class`` instance whose parameters are views into one flat buffer,
fills their ``.grad`` from the buffer the proxy sends, calls ``optimizer.step()``, and hands the
updated flat buffer back.

Talks to: nothing directly; its host hands it the records of :mod:`shardopt.core.records` and
:mod:`shardopt.checkpoint` writes and reads its part of a checkpoint.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shardopt.actor.state_ledger import StateLedger
from shardopt.actor.vectors import VectorStore
from shardopt.core import shm
from shardopt.core.amp import step_scaled
from shardopt.core.buffers import (
    FlatLayout,
    PackedTree,
    pack_tree,
    readonly_tensor,
    to_numpy,
    unpack_tree,
)
from shardopt.core.default_dtype import running_under
from shardopt.core.param_groups import (
    fuses_by_default,
    is_fusable,
    place_state,
    sparse_step_keeps_other_rows,
)
from shardopt.core.plan import RowRange
from shardopt.core.records import (
    ParamBlock,
    ParamUpdate,
    ShardExport,
    ShardSpec,
    ShardStatus,
    SharedBuffers,
    SharedTree,
    StepRequest,
    StepResult,
)
from shardopt.core.state_checks import check_param_state

if TYPE_CHECKING:  # imported where a checkpoint is read or written: torch's DCP, which they
    # import, is about a second of a shard host's start
    from shardopt.checkpoint.format import ShardSave
    from shardopt.checkpoint.integrity import Commit

logger = logging.getLogger(__name__)


def _copy_into(dst: torch.Tensor, src_array) -> None:
    """Copies a (read-only) numpy buffer into a uint8 tensor on any device."""
    dst.copy_(readonly_tensor(src_array), non_blocking=False)


class Shard:
    """The master parameters and optimizer of one shard.

    Args:
        shard_index: this shard's position in its optimizer's plan.
        spec: the optimizer class, its defaults, every param group's options, and the initial
            values of this shard's parameters.
        device: where the parameters and state live (defaults to CPU).
    """

    def __init__(
        self,
        shard_index: int,
        spec: ShardSpec,
        device: str | torch.device = "cpu",
        shared_memory: bool = False,
    ):
        self.shard_index = shard_index
        self.device = torch.device(device)
        self._shared = shared_memory and self.device.type == "cpu" and shm.available()
        self._shm_paths: tuple[str, str] | None = None
        self._param_ids: list[int] = []
        self._pieces: dict[int, RowRange] = {}  # the rows held of parameters split across shards
        self._group_of: list[int] = []
        self._params: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []
        self._local_of: dict[int, int] = {}  # global id -> local index
        self._id_of: dict[int, int] = {}  # id(parameter tensor) -> global id
        self._layout = FlatLayout.for_specs([])
        self._flat = self._layout.empty(self.device)
        self._grad_flat = self._layout.empty(self.device)
        self._adopt(spec.params, force=True)
        self._optimizer_class = spec.optimizer_class
        self._defaults = spec.defaults
        self._default_dtype = spec.default_dtype
        self._unfused = set(spec.params.unfused_groups)
        self._fusable = [
            g not in self._unfused and is_fusable(self._params_in_group(g))
            for g in range(len(spec.group_options))
        ]
        groups = [
            {**self._run_options(options, g), "params": self._params_in_group(g)}
            for g, options in enumerate(spec.group_options)
        ]
        with running_under(self._default_dtype):  # Adagrad makes its state here
            self.optimizer: torch.optim.Optimizer = spec.optimizer_class(groups, **spec.defaults)
        self.state_ledger = StateLedger(lambda: self.optimizer.state, self._id_of)
        self._last_step_id = -1
        self._last_result: StepResult | None = None
        self._packed_states: dict[str, np.ndarray] = {}  # token -> state packed for the proxy
        self._pending_loads: dict[str, tuple[Any, Any]] = {}
        self._saves: dict[str, ShardSave] = {}
        self.vectors = VectorStore(self)

    # ----- parameters -------------------------------------------------------------------------

    def _run_options(self, options: dict[str, Any], group: int) -> dict[str, Any]:
        """A group's options as this shard runs them: fused where torch's default is not asked."""
        if self._fusable[group] and fuses_by_default(
            self._optimizer_class, options, self._default_dtype
        ):
            return {**options, "fused": True}
        return options

    def _params_in_group(self, group: int) -> list[torch.Tensor]:
        return [p for p, g in zip(self._params, self._group_of) if g == group]

    def _allocate(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str] | None]:
        """The parameter and gradient buffers: both in shared memory when the proxy is local,
        else (or when ``/dev/shm`` has no room for both) both in this process."""
        if self._shared:
            created: list[tuple[torch.Tensor, str]] = []
            try:
                created = [shm.create(nbytes)]
                created.append(shm.create(nbytes))
                (flat, flat_path), (grad, grad_path) = created
                return flat, grad, (flat_path, grad_path)
            except OSError as err:  # /dev/shm is full: fall back to Ray's object store
                for _, path in created:
                    shm.remove(path)
                logger.warning("shard %d: no room in %s (%s)", self.shard_index, shm.SHM_DIR, err)
                self._shared = False
        empty = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return empty[0], empty[1], None

    def shared_buffers(self) -> SharedBuffers | None:
        """Where the proxy can map this shard's buffers (None unless in shared memory)."""
        if self._shm_paths is None:
            return None
        return SharedBuffers(*self._shm_paths, nbytes=self._layout.nbytes)

    def shared_paths(self) -> tuple[str, ...]:
        """The shared-memory files of this shard's buffers (none unless in shared memory)."""
        return tuple(self._shm_paths or ())

    def reshare(self, shared: bool) -> SharedBuffers | None:
        """Moves the parameter and gradient buffers into new shared-memory files (``shared``,
        where ``/dev/shm`` has room) or into this process, keeping the values and the tensors'
        identities. For a proxy in a new process (a restarted gateway): the old files were
        unlinked once the first proxy mapped them."""
        self._shared = shared
        flat, grad_flat, paths = self._allocate(self._layout.nbytes)
        flat.copy_(self._flat)
        self._unlink_shared()
        self._shm_paths = paths
        for i, (p, g) in enumerate(zip(self._params, self._grads)):
            self._layout.rebind(p, flat, i)
            self._layout.rebind(g, grad_flat, i)
        self._flat, self._grad_flat = flat, grad_flat
        return self.shared_buffers()

    def _unlink_shared(self) -> None:
        for path in self._shm_paths or ():
            shm.remove(path)

    def close(self) -> None:
        """Removes this shard's shared-memory files (mappings stay valid until dropped)."""
        self._unlink_shared()
        self._shm_paths = None

    def _adopt(self, block: ParamBlock, force: bool = False) -> list[torch.Tensor]:
        """Appends ``block``'s parameters to the flat buffers, keeping tensor identities."""
        if not block.param_ids and not force:
            return []
        old_count = len(self._params)
        specs = list(zip(block.layout.shapes, block.layout.dtypes))
        layout = self._layout.extended(specs)
        flat, grad_flat, paths = self._allocate(layout.nbytes)
        flat[: self._layout.nbytes].copy_(self._flat)
        self._unlink_shared()
        self._shm_paths = paths
        for i, (p, g) in enumerate(zip(self._params, self._grads)):
            layout.rebind(p, flat, i)
            layout.rebind(g, grad_flat, i)
        new_values = readonly_tensor(block.values)
        new_params = []
        for j, (pid, group) in enumerate(zip(block.param_ids, block.group_indices)):
            i = old_count + j
            p = layout.bind(flat, i)
            p.copy_(block.layout.view(new_values, j))
            self._params.append(p)
            self._grads.append(layout.bind(grad_flat, i))
            self._param_ids.append(pid)
            if block.rows and block.rows[j] is not None:
                start, rows = block.rows[j]
                self._pieces[pid] = RowRange(start, start + p.shape[0], rows)
            self._group_of.append(group)
            self._local_of[pid] = i
            self._id_of[id(p)] = pid
            new_params.append(p)
        self._layout, self._flat, self._grad_flat = layout, flat, grad_flat
        return new_params

    def add_param_group(self, options: dict[str, Any], block: ParamBlock) -> SharedBuffers | None:
        """Adds one param group (possibly with none of its parameters on this shard).

        Returns:
            The shard's shared buffers, which move when parameters were added.
        """
        new_params = self._adopt(block)
        group = len(self._fusable)
        self._unfused.update(block.unfused_groups)
        self._fusable.append(group not in self._unfused and is_fusable(new_params))
        self.optimizer.add_param_group({**self._run_options(options, group), "params": new_params})
        self.state_ledger.gained()
        return self.shared_buffers()

    def set_params(self, update: ParamUpdate) -> None:
        """Overwrites some master parameters with values the user set on the client."""
        values = readonly_tensor(update.values)
        with torch.no_grad():
            for j, i in enumerate(update.local_indices):
                self._params[i].copy_(update.layout.view(values, j))

    def param_values(self) -> Any:
        """The flat buffer of this shard's parameters as numpy (a snapshot once sent)."""
        return to_numpy(self._flat)

    @property
    def params(self) -> list[torch.Tensor]:
        """The master parameters, views into the flat buffer, in local order."""
        return self._params

    @property
    def layout(self) -> FlatLayout:
        """Where each of this shard's parameters (and gradients) lies in its flat buffers."""
        return self._layout

    def grad_buffer(self) -> torch.Tensor:
        """The flat gradient buffer a step with ``grads=None`` reads (a group fills it)."""
        return self._grad_flat

    def param_buffer(self) -> torch.Tensor:
        """The flat buffer of the master parameters, on this shard's device."""
        return self._flat

    # ----- stepping ---------------------------------------------------------------------------

    def initial_state_ids(self) -> tuple[int, ...]:
        """Parameters given state by the optimizer's constructor (Adagrad does this)."""
        return self.state_ledger.gained()

    def step(
        self, request: StepRequest, grad_tensors: Sequence[torch.Tensor] | None = None
    ) -> StepResult:
        """Applies one step exactly once; a repeated ``step_id`` returns the earlier result.

        Args:
            grad_tensors: the dense gradients where they are, laid out as this shard's
                parameters (an async group rank's slot, read in place), instead of the
                gradient buffer (``request.grads`` must then be None).
        """
        if request.step_id <= self._last_step_id:
            last = self._last_result
            if request.step_id == self._last_step_id and last is not None:
                if request.return_params and last.params is None and not self._shm_paths:
                    last = StepResult(last.step_id, self.param_values(), last.new_state_ids)
                return last
            raise ValueError(
                f"shard {self.shard_index}: step {request.step_id} is older than the last "
                f"applied step {self._last_step_id}"
            )
        if request.params_in is not None:
            self.set_params(request.params_in)
        for g, (group, options) in enumerate(
            zip(self.optimizer.param_groups, request.group_options)
        ):
            group.update(self._run_options(options, g))
        if request.grads is not None:
            _copy_into(self._grad_flat, request.grads)
        for i, p in enumerate(self._params):
            sparse = request.sparse_grads.get(i)
            if sparse is not None:
                p.grad = torch.sparse_coo_tensor(
                    readonly_tensor(sparse.indices).to(self.device),
                    readonly_tensor(sparse.values).to(self.device),
                    p.shape,
                    check_invariants=True,  # an index outside p: an error, not a stray write
                ).coalesce()
            elif request.has_grad[i]:
                p.grad = self._grads[i] if grad_tensors is None else grad_tensors[i]
            else:
                p.grad = None
        with running_under(self._default_dtype):
            step_scaled(self.optimizer, request.scaling)
        for p in self._params:
            p.grad = None
        rows_only = (
            bool(request.sparse_grads)
            and not any(request.has_grad)
            and all(
                sparse_step_keeps_other_rows(
                    self._optimizer_class, self.optimizer.param_groups[self._group_of[i]]
                )
                for i in request.sparse_grads
            )
        )
        params, rows = None, {}
        if request.return_params and not self._shm_paths:
            if rows_only:  # only the rows touched changed: only they go back
                rows = {}
                for i, grad in request.sparse_grads.items():
                    index = torch.from_numpy(grad.touched_rows()).to(self.device)
                    rows[i] = to_numpy(self._params[i][index].cpu())
            else:
                params = self.param_values()
        result = StepResult(
            step_id=request.step_id,
            params=params,
            new_state_ids=self.state_ledger.gained(),
            rows=rows,
            rows_only=rows_only,
        )
        self._last_step_id = request.step_id
        self._last_result = result
        return result

    # ----- moving a shard (fault tolerance) -------------------------------------------------

    def export(self) -> ShardExport:
        """This shard as it is now: parameters, groups, optimizer state, last step."""
        block = ParamBlock(
            param_ids=tuple(self._param_ids),
            group_indices=tuple(self._group_of),
            layout=self._layout,
            values=to_numpy(self._flat.detach().cpu().clone()),
            rows=tuple(
                (self._pieces[pid].start, self._pieces[pid].rows) if pid in self._pieces else None
                for pid in self._param_ids
            )
            if self._pieces
            else (),
            unfused_groups=tuple(sorted(self._unfused)),
        )
        options = tuple(
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        )
        spec = ShardSpec(self._optimizer_class, self._defaults, options, block, self._default_dtype)
        return ShardExport(spec, self.state(), self._last_step_id, self._last_result)

    def restore(self, export: ShardExport) -> None:
        """Takes over an exported shard's parameter values, optimizer state and step history
        (a shard of the same parameters: a replica being refreshed, or a new one)."""
        with torch.no_grad():
            self._flat.copy_(readonly_tensor(export.spec.params.values).to(self.device))
        token = "restore"
        error = self.prepare_load(token, export.spec.group_options, export.state)
        if error is not None:
            raise error
        self.commit_load(token)
        self._last_step_id = export.last_step_id
        last = export.last_result
        if last is not None and last.params is None and self._shm_paths is None:
            last = StepResult(last.step_id, self.param_values(), last.new_state_ids)
        self._last_result = last

    def run_vectors(self, program: list[tuple]) -> list[Any]:
        """Runs a program of named-vector operations (sharded LBFGS); see shardopt.actor.vectors."""
        with running_under(self._default_dtype):  # torch's LBFGS mixes numbers and tensors
            return self.vectors.run(program)

    # ----- state ------------------------------------------------------------------------------

    def _state_by_id(self, param_ids: tuple[int, ...] | None = None) -> dict[int, Any]:
        """This shard's optimizer state by global id (all of it, or only ``param_ids``)."""
        state = {self._id_of[id(p)]: value for p, value in self.optimizer.state.items()}
        if param_ids is not None:
            state = {pid: state[pid] for pid in param_ids if pid in state}
        return state

    def state(self, param_ids: tuple[int, ...] | None = None) -> PackedTree:
        """This shard's optimizer state by global id (all of it, or only ``param_ids``)."""
        return pack_tree(self._state_by_id(param_ids))

    MAX_PACKED_STATES = 2
    """States a shard keeps packed for proxies to pull (the oldest goes when one more comes)."""

    def pack_state(self, param_ids: tuple[int, ...] | None = None) -> tuple[str, Any, FlatLayout]:
        """Packs this shard's state aside for the proxy to pull in pieces
        (:meth:`state_chunk`) and drop (:meth:`drop_state`): the proxy then never holds more
        than a chunk of it beyond the tensors it is filling.

        Returns:
            A token for the packed state, its skeleton and its layout.
        """
        packed = pack_tree(self._state_by_id(param_ids))
        while len(self._packed_states) >= self.MAX_PACKED_STATES:
            self._packed_states.pop(next(iter(self._packed_states)))
        token = uuid.uuid4().hex
        self._packed_states[token] = packed.data
        return token, packed.skeleton, packed.layout

    def state_chunk(self, token: str, start: int, stop: int) -> np.ndarray:
        """Bytes ``[start, stop)`` of a state packed by :meth:`pack_state`."""
        data = self._packed_states.get(token)
        if data is None:
            raise KeyError(f"shard {self.shard_index}: no packed state {token!r} (dropped)")
        return data[start:stop]

    def drop_state(self, token: str) -> None:
        """Forgets a state packed by :meth:`pack_state`."""
        self._packed_states.pop(token, None)

    def state_in_shared_memory(self, param_ids: tuple[int, ...] | None = None) -> SharedTree:
        """Like :meth:`state`, but written to a shared-memory file the proxy maps (one copy).

        Falls back to a :class:`PackedTree` through Ray when shared memory is unavailable.
        """
        state = self._state_by_id(param_ids)
        if not self._shared:
            return pack_tree(state)
        paths: list[str] = []

        def allocate(nbytes: int) -> torch.Tensor:
            buffer, path = shm.create(nbytes)
            paths.append(path)
            return buffer

        try:
            packed = pack_tree(state, allocate)
        except OSError:
            for path in paths:
                shm.remove(path)
            return pack_tree(state)
        return SharedTree(packed.skeleton, packed.layout, paths[0])

    def set_param_state(self, param_id: int, packed: PackedTree) -> None:
        """Replaces one parameter's state (the proxy's ``opt.state[p] = ...``)."""
        local = self._local_of[param_id]
        p = self._params[local]
        group = self.optimizer.param_groups[self._group_of[local]]
        state = place_state(unpack_tree(packed), p.device, group)
        before = self.optimizer.state.get(p)
        state = check_param_state(self._optimizer_class, p, state, self._name(p), before)
        self.optimizer.state[p] = state
        self.state_ledger.gained()

    def clear_param_state(self, param_id: int) -> None:
        """Drops one parameter's state (the proxy's ``del opt.state[p]``): its next step
        starts it afresh, and it then comes last in the state's order, as in torch."""
        self.optimizer.state.pop(self._params[self._local_of[param_id]], None)
        self.state_ledger.replaced()

    def prepare_load(
        self, token: str, group_options: tuple[dict[str, Any], ...], packed: PackedTree
    ) -> Exception | None:
        """Phase one of an all-or-nothing load: build the new state aside, report any error.

        Nothing visible changes until :meth:`commit_load`; :meth:`abort_load` drops the candidate.
        Returns the exception that rejected the state, or None.
        """
        # on the CPU: torch's load_state_dict moves each tensor where torch keeps it
        return self._prepare(token, group_options, lambda: unpack_tree(packed))

    def prepare_load_from_checkpoint(
        self,
        token: str,
        group_options: tuple[dict[str, Any], ...],
        commit: Commit,
    ) -> tuple[Exception | None, tuple[int, ...]]:
        """:meth:`prepare_load` with this shard's part read from a checkpoint by the shard itself.

        ``commit`` is the checkpoint as the proxy checked it (record, signature, metadata);
        this shard checks every slice it reads against that record.

        Returns:
            The exception that rejected the state (or None), and the ids that have state.
        """
        from shardopt.checkpoint import format as checkpoint  # (see TYPE_CHECKING above)

        found: list[int] = []

        def read() -> dict[int, Any]:
            state = checkpoint.read_params_state(commit, self._param_ids, self._pieces)
            found.extend(sorted(state))
            return state

        return self._prepare(token, group_options, read), tuple(found)

    def _prepare(
        self, token: str, group_options: tuple[dict[str, Any], ...], read_state: Any
    ) -> Exception | None:
        opt = self.optimizer
        old = (opt.state, opt.param_groups)
        try:
            state_by_id = read_state()
            local_state = {}
            for pid, value in state_by_id.items():
                if pid not in self._local_of:
                    raise ValueError(f"shard {self.shard_index} does not hold parameter id {pid}")
                local_state[self._local_of[pid]] = value
            groups = []
            for g, options in enumerate(group_options):
                ids = [i for i, grp in enumerate(self._group_of) if grp == g]
                groups.append({**self._run_options(options, g), "params": ids})
            with running_under(self._default_dtype):  # a step given as a number becomes one
                opt.load_state_dict({"state": local_state, "param_groups": groups})
            for p, new_state in list(opt.state.items()):  # (torch's fused kernels do not check)
                opt.state[p] = check_param_state(
                    self._optimizer_class, p, new_state, self._name(p), old[0].get(p)
                )
            self._pending_loads[token] = (opt.state, opt.param_groups)
            return None
        except Exception as exc:  # reported to the proxy, which rejects the whole load
            return exc
        finally:
            opt.__dict__.update(state=old[0], param_groups=old[1])

    def _name(self, p: torch.Tensor) -> str:
        return f"parameter id {self._id_of.get(id(p))}"

    # ----- checkpoints (see shardopt.checkpoint) -------------------------------------------

    def save_plan(self, token: str, path: str, param_groups: list[dict] | None) -> Any:
        """Snapshots this shard's state (the save's point in time) and returns DCP's local plan.

        The shard given ``param_groups`` also stores them (one shard does).
        """
        from shardopt.checkpoint import format as checkpoint  # (see TYPE_CHECKING above)

        state: dict[str, Any] = {
            "state": {
                str(pid): checkpoint.snapshot(v, self._pieces.get(pid))
                for pid, v in self._state_by_id().items()
            }
        }
        if param_groups is not None:
            state["param_groups"] = param_groups
        save = checkpoint.ShardSave(path, state, is_coordinator=param_groups is not None)
        self._saves[token] = save
        return save.local_plan()

    def save_write(self, token: str, plan: Any) -> None:
        """Starts writing this shard's data file in the background; steps go on meanwhile."""
        self._saves[token].start_writing(plan)

    def save_wait(self, token: str) -> tuple[list[Any], dict[str, dict[str, Any]]]:
        """Waits for the data file; returns DCP's write results and the file's digests."""
        return self._saves.pop(token).wait()

    def save_done(self, token: str) -> bool:
        return self._saves[token].done()

    def commit_load(self, token: str) -> None:
        state, groups = self._pending_loads.pop(token)
        self.optimizer.__dict__.update(state=state, param_groups=groups)
        self.state_ledger.replaced()

    def abort_load(self, token: str) -> None:
        self._pending_loads.pop(token, None)

    def status(self) -> ShardStatus:
        return ShardStatus(
            shard_index=self.shard_index,
            device=str(self.device),
            fused=any(bool(g.get("fused")) for g in self.optimizer.param_groups),
            num_params=len(self._params),
            param_bytes=self._layout.nbytes,
            state_ids=tuple(self._state_by_id()),
            last_step_id=self._last_step_id,
        )
