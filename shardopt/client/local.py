"""The backend for shards of this process: Ray actors borrowed from the host pool.

:class:`LocalShards` places the parameters (:class:`~shardopt.client.shard_map.ShardMap`),
creates one :class:`~shardopt.actor.shard.Shard` per shard on pooled hosts, and moves tensors
through a :class:`~shardopt.client.data_path.DataPath`: shared memory with CPU shards on this
node, Ray's object store otherwise. A step packs each shard's gradients into one flat buffer
and sends the shard its step at once, the shards update in parallel with torch's own
optimizer, and each shard's new parameters are copied into the user's tensors as soon as it
answers. With ``replicate`` every shard has a replica (:mod:`shardopt.client.replication`).

Talks to: shard hosts through :class:`~shardopt.client.handles.ShardHandle`; the host pool of
:mod:`shardopt.client.runtime`.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from itertools import chain
from typing import Any

import ray
import torch

from shardopt.actor.threads import threads_left, threads_per_shard
from shardopt.checkpoint.integrity import Commit
from shardopt.client import transport as transport_module
from shardopt.client.backend import ParamSource
from shardopt.client.data_path import DataPath, GradShipper
from shardopt.client.handles import ShardHandle
from shardopt.client.lanes import LANE_TYPES, Lanes, first_answer, land, net_lanes_enabled
from shardopt.client.ray_shards import RayShards
from shardopt.client.replication import Replicas
from shardopt.client.runtime import drop_shards, host_pool, ray_get
from shardopt.client.shard_map import ShardMap
from shardopt.client.step_flight import StepInFlight, result_of
from shardopt.core import omp_threads
from shardopt.core.amp import AmpScaling
from shardopt.core.buffers import to_numpy
from shardopt.core.errors import PartialStepError, ShardUnavailableError
from shardopt.core.events import emit
from shardopt.core.lane import LaneBroken
from shardopt.core.metrics import SHARD_STEP_SECONDS, STEP_BYTES
from shardopt.core.param_groups import group_options
from shardopt.core.plan import Piece
from shardopt.core.records import ShardSpec, ShardStatus, StepRequest

logger = logging.getLogger(__name__)


class LocalShards(RayShards):
    """Shards of this process on pooled Ray actors (see the module docstring).

    Args:
        params: the proxy's parameters.
        num_shards: how many shards.
        actor_options: the shard hosts' ``.options(...)``.
        shared_memory: None (wherever possible) or False (never).
        overlap: ship gradients during backward.
        share_params: re-point CPU parameters into the shards' shared buffers.
        replicate: 0 (off), 1 (replicas run every step) or k (refreshed every k steps:
            ``replica_refresh=k``).
        transport: how tensors reach each shard (:mod:`shardopt.client.transport`); with
            replicas, or for LBFGS, shared memory or the object store.
    """

    per_tensor = True
    """Whether its shards step their tensors on their own (LBFGS's backend does not)."""
    kind = "local"
    copy_threads: int | None = None
    """Torch threads for the client's copies during a step (``threads_left``; None: all)."""

    def __init__(
        self,
        params: ParamSource,
        num_shards: int,
        *,
        actor_options: dict[str, Any],
        shared_memory: bool | None,
        overlap: bool,
        share_params: bool,
        replicate: int,
        transport: str = "auto",
    ) -> None:
        self._params = params
        self.actor_options = actor_options
        self._overlap = overlap
        self.shard_map = ShardMap(num_shards)
        self.data_path = DataPath(
            self.shard_map, share_params=share_params, replicated=bool(replicate)
        )
        self._next_step_id = 0
        self._closed = False
        self.replicas: Replicas | None = None
        blocks = self._place(params.flat(), params.group_indices(), params.splittable())
        options = params.options()
        specs = [params.spec(blocks[s], options) for s in range(num_shards)]
        self._node = ray.get_runtime_context().get_node_id()  # this process's
        direct_ok = self.per_tensor and not replicate  # replicas take numpy gradients
        if transport == "object_store" or (direct_ok and transport_module.is_direct(transport)):
            shared_memory = False  # asked for by name: not shared memory
        transport = transport if direct_ok else "object_store"
        host_options, client = actor_options, transport_module.ClientSide.here()
        if transport_module.needs_rdt_hosts(transport, actor_options, client):
            host_options = {**actor_options, "enable_tensor_transport": True}
        created = self._open_shards(specs, host_options, shared_memory)
        flat = params.flat()
        for s, (_, buffers) in enumerate(created):
            self.data_path.map_shared(s, buffers, flat)
        self._choose_transports(transport, client)
        self.shard_map.note_state(chain.from_iterable(ids for ids, _ in created))
        self.lanes = Lanes()
        self._net_lanes = shared_memory is not False and net_lanes_enabled()
        if self.per_tensor and not replicate:  # replicas export from primaries in Ray's order
            self._open_lanes()
        if replicate:
            self.replicas = Replicas(self, interval=replicate)
            self.replicas.start(specs)

    def _hosts(
        self, num_shards: int, actor_options: dict[str, Any], shared_memory: bool | None
    ) -> tuple[list[Any], list[bool]]:
        """Sets ``handles``, ``host_nodes``, ``threads`` and the finalizer that drops the
        shards, for ``hosts`` from the pool; returns the hosts and whether each shard shares
        memory with this process."""
        hosts, infos = host_pool.acquire(num_shards, actor_options)
        owner = host_pool.new_owner_key()
        self.handles = [ShardHandle(h, f"{owner}/{s}", s) for s, h in enumerate(hosts)]
        self._drop_at_close(self.handles)
        here = self._node
        shared = [
            shared_memory is not False and info["node_id"] == here and info["device"] == "cpu"
            for info in infos
        ]
        self.host_nodes = [info["node_id"] for info in infos]
        self._host_infos = infos
        self.threads = threads_per_shard(infos, "num_cpus" in actor_options)
        devices = [info["device"] for info in infos]
        reserved = float(actor_options.get("num_cpus", 1))
        self.copy_threads = threads_left(here, self.host_nodes, devices, self.threads, reserved)
        return hosts, shared

    def _drop_at_close(self, handles: list[ShardHandle]) -> None:
        """Drops these shards and releases their hosts to the pool at :meth:`close`, or when
        this backend is collected (see :meth:`hold` for later ones)."""
        self._held = ([h.host for h in handles], [h.key for h in handles])
        self._finalizer = weakref.finalize(self, drop_shards, *self._held)

    def hold(self, handle: ShardHandle) -> None:
        """Takes a shard created later on a host of the pool (a lost shard rebuilt, see
        :mod:`shardopt.client.replication`): dropped and its host released with the others."""
        hosts, keys = self._held
        hosts.append(handle.host)
        keys.append(handle.key)

    def _open_shards(
        self, specs: list[ShardSpec], actor_options: dict[str, Any], shared_memory: bool | None
    ) -> list[tuple[tuple[int, ...], Any]]:
        """Creates the shards (see :meth:`_hosts`); returns each one's ids with optimizer
        state and its shared buffers (if any). A restarted gateway attaches to existing ones
        instead (:mod:`shardopt.gateway.resume`)."""
        _, shared = self._hosts(len(specs), actor_options, shared_memory)
        return ray_get(
            [
                h.host.create.remote(h.key, s, specs[s], shared[s], self.threads[s])
                for s, h in enumerate(self.handles)
            ]
        )

    def _choose_transports(self, requested: str, client: transport_module.ClientSide) -> None:
        """Sets each shard's transport (:mod:`shardopt.client.transport`) and where its
        gradients are gathered here: on the client's GPU for RDT, in pinned memory for the
        object store from CUDA tensors."""
        infos = getattr(self, "_host_infos", None)
        if infos is None:  # shards attached, not created here: the defaults
            return
        flat = self._params.flat()
        devices = [{flat[slot.pid].device for slot in self.shard_map.slots(s)} for s in range(
            self.num_shards)]  # fmt: skip
        shared = [self.data_path.shared_params(s) is not None for s in range(self.num_shards)]
        self.transports = transport_module.choose_all(requested, client, infos, devices, shared)
        transport_module.await_registration([h.host for h in self.handles], self.transports)
        for s, chosen in enumerate(self.transports):
            cuda = [d for d in devices[s] if d.type == "cuda"]
            if transport_module.is_direct(chosen) and cuda:
                self.data_path.stage_on(s, cuda[0])
            elif cuda:
                self.data_path.stage_on(s, torch.device("cpu"), pin_memory=True)

    def _direct(self, shard: int) -> str | None:
        """The shard's Ray Direct Transport, if it uses one."""
        chosen = self.transports[shard] if self.transports else None
        return chosen if transport_module.is_direct(chosen) else None

    def _place(
        self,
        new_params: list[torch.Tensor],
        groups: list[int],
        splittable: list[bool],
        pieces: tuple[tuple[Piece, ...], ...] | None = None,
    ) -> list[Any]:
        first = self.shard_map.num_params
        blocks = self.shard_map.place(new_params, groups, splittable, pieces)
        if self._overlap:
            for j, p in enumerate(new_params):
                p.register_post_accumulate_grad_hook(GradShipper(self.data_path, first + j))
        return blocks

    def _open_lanes(self, net_only: bool = False) -> None:
        """Opens a step lane (:mod:`shardopt.core.lane`) to each shard in shared memory, and a
        network lane (:mod:`shardopt.core.net_lane`) to each CPU shard on another node (unless
        ``shared_memory=False`` or ``SHARDOPT_NET_LANES=0``; only these with ``net_only``).

        Not with replicas: a replica's refresh sends its primary an export that the next step
        must not overtake, and a step through a lane would (Ray keeps one caller's calls in
        order; a lane does not wait for them).
        """
        live = range(self.num_shards)
        shared = [s for s in live if not net_only and self.data_path.shared_params(s) is not None]
        remote = [
            s
            for s in live
            if self._net_lanes and self.host_nodes[s] != self._node and not self._direct(s)
        ]
        calls = [self.handles[s].open_lane() for s in shared]
        addresses = ray_get(calls + [self.handles[s].open_net_lane() for s in remote])
        for s, address in zip(shared + remote, addresses):
            self.lanes.open(s, self.handles[s], address)

    def handle(self, shard: int) -> ShardHandle:
        if self.replicas is not None:  # its replica follows the calls that change it
            return self.replicas.mirrored(shard)
        return self.handles[shard]

    def spec_now(self, shard: int) -> ShardSpec:
        """A spec for ``shard`` from this process's copy of its parameters (to rebuild it)."""
        params = self._params
        block = self.shard_map.block_of(shard, params.flat(), params.group_indices())
        return params.spec(block, params.options())

    @property
    def uses_shared_memory(self) -> list[bool]:
        return self.data_path.uses_shared_memory

    def shard_nodes(self) -> list[str | None]:
        return list(self.host_nodes)

    def grad_slot(self, pid: int) -> torch.Tensor | None:
        return self.data_path.grad_slot(pid)

    @property
    def next_step_id(self) -> int:
        return self._next_step_id

    def repeat_from(self, step_id: int) -> None:
        """Gives the next step the id ``step_id`` (at most one back: a gateway repeating a
        step whose answer its client lost). Each shard applies a step id once, and answers a
        repeat of its last one with its parameters as they are."""
        if step_id < self._next_step_id - 1:
            raise ValueError(
                f"step {step_id} was applied before step {self._next_step_id - 1}: it cannot "
                "be repeated"
            )
        self._next_step_id = step_id

    # ----- stepping -------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None, scaling: AmpScaling | None) -> Any:
        loss = self._params.evaluate(closure)
        self._update(scaling)
        return loss

    def _update(self, scaling: AmpScaling | None) -> None:
        """Packs and sends every shard's step, and copies each one's parameters back."""
        if scaling is not None and scaling.grad_scale is None:
            self.data_path.forget_shipped()  # scaler.unscale_ wrote without a version bump
        params = self._params.flat()
        options = self._params.options()
        step_id = self._next_step_id
        self._next_step_id += 1
        replicas = self.replicas
        if replicas is not None:
            replicas.settle()
        flight = StepInFlight(step_id, params)
        try:  # from the first send on: a lane whose answer is not read is closed at the end
            self._send_all(flight, options, scaling)
            self._answers(flight)
        except BaseException:  # (Ctrl-C) the shards sent apply it all the same
            self._let_land(flight)
            raise
        finally:  # a lane whose answer was not read would hand it to the next step
            for answer, s in flight.pending.items():
                if isinstance(answer, LANE_TYPES):
                    self.lanes.close(s)
        if flight.failures:
            self._step_failed(step_id, flight.failures, flight.sent)
        self._replicate(flight.sent)  # only now: until every shard applied it, they roll back
        self.shard_map.note_state(flight.new_state)

    def _send_all(
        self, flight: StepInFlight, options: tuple[dict[str, Any], ...], scaling: AmpScaling | None
    ) -> None:
        """Packs and sends each shard's step in turn."""
        with omp_threads.at_most(self.copy_threads):  # the shards here get this node's CPUs
            for s in self.shard_map.live_shards():
                try:
                    out = self._pack_and_send(s, flight.step_id, options, flight.params, scaling)
                except Exception as err:  # the shards sent apply it all the same: _step_failed
                    if not flight.pending:
                        raise
                    flight.failures[s] = err
                    break
                if out is not None:
                    answer, request, flight.outgoing[s], flat, flight.touched[s] = out
                    flight.pending[answer] = s
                    flight.sent[s] = (request, flat)
        self.data_path.forget_shipped()

    def _answers(self, flight: StepInFlight) -> None:
        """Reads each shard's answer as it comes, and copies its parameters back at once."""
        replicas, pending, sent = self.replicas, flight.pending, flight.sent
        sent_at, optimizer = time.perf_counter(), self._params.optimizer_class.__name__
        while pending:
            answer, s = first_answer(pending)
            try:
                result = result_of(answer)
            except LaneBroken as err:  # Ray knows whether the shard is gone; it applies it once
                logger.debug("shard %d: %s; step %d goes through Ray", s, err, flight.step_id)
                self.lanes.close(s)
                pending[self.handles[s].step(flight.outgoing[s])] = s
                continue
            except ShardUnavailableError as err:
                if replicas is None:  # the others may have applied it: see _step_failed
                    flight.failures[s] = err
                else:
                    pending[replicas.recover(s, *sent[s])] = s
                continue
            except Exception as err:  # the others may have applied it: see _step_failed
                flight.failures[s] = err
                if self._direct(s):  # a failed transfer may have broken RDT's state
                    logger.warning("shard %d: direct step failed (%s): object store", s, err)
                    self.transports[s] = "object_store"  # type: ignore[index]
                    self.data_path.stage_on(s, torch.device("cpu"), pin_memory=True)
                continue
            flight.applied.append(s)
            SHARD_STEP_SECONDS.labels(optimizer, str(s)).observe(time.perf_counter() - sent_at)
            last = not pending  # every shard done: this node's CPUs are free again
            with omp_threads.at_most(None if last else self.copy_threads):
                self._take_params(s, result, sent[s][0], flight.touched[s], flight.params)
            flight.new_state.extend(result.new_state_ids)

    def _let_land(self, flight: StepInFlight) -> None:
        """A step stopped part-way (Ctrl-C, or an error here): waits at most ``LAND_S`` for
        the shards it was sent to, which apply it all the same, copies their parameters back
        and sends it to their replicas. Else a late answer would meet the next step: the lane
        opened again for it drops the request it finds unread, and the replica never gets it.
        A shard that does not answer in time keeps its lane closed (``_update``'s finally)."""

        def take(answer: Any, s: int) -> None:
            result = result_of(answer)
            self._take_params(s, result, flight.sent[s][0], flight.touched[s], flight.params)
            flight.applied.append(s)
            flight.new_state.extend(result.new_state_ids)

        land(flight.pending, take, f"step {flight.step_id}")
        try:  # what stopped the step is what it raises
            self._replicate({s: flight.sent[s] for s in flight.applied})
            self.shard_map.note_state(flight.new_state)
        except Exception as err:
            logger.warning("step %d stopped part-way; its replicas: %s", flight.step_id, err)

    def _replicate(self, shards: dict[int, tuple[StepRequest, torch.Tensor]]) -> None:
        """Sends the step to the replicas of ``shards`` (which applied it)."""
        if self.replicas is None:
            return
        for s, (request, flat) in shards.items():
            grads = to_numpy(flat) if any(request.has_grad) else None
            self.replicas.step(s, replace(request, grads=grads, return_params=False))

    def _pack_and_send(
        self,
        s: int,
        step_id: int,
        options: tuple[dict[str, Any], ...],
        params: list[torch.Tensor],
        scaling: AmpScaling | None,
    ) -> tuple[Any, StepRequest, StepRequest, torch.Tensor, list[int]] | None:
        """Packs shard ``s``'s gradients and sends its step at once: one copying thread leaves
        memory bandwidth unused, which this shard's update takes while the next one is packed.

        Returns:
            What to wait on, the step's request (for replicas and retries), the request sent,
            the gradient buffer and the slots the step changes; None where it changes none.
        """
        changed = self.data_path.changed_params(s, params)
        flat, has_grad, sparse, touched = self.data_path.pack_grads(s, params, scaling)
        shared = self.data_path.shared_params(s) is not None
        if not touched:
            if changed is not None:  # written already where shared; replicas need it
                ray_get(self.handle(s).set_params(changed))
            return None
        direct = None if sparse else self._direct(s)
        request = StepRequest(
            step_id=step_id,
            group_options=options,
            grads=None if shared or direct or not any(has_grad) else to_numpy(flat),
            has_grad=has_grad,
            sparse_grads=sparse,
            params_in=changed,  # written already where shared (for a replica, a resend)
            scaling=scaling,
        )
        if direct:  # GPU to GPU
            grads = ray.put(flat, _tensor_transport=direct) if any(has_grad) else None
            answer = self.handles[s].step_direct(request, grads, direct)
            del grads  # RDT objects stay unchanged: dropped before the buffer is reused
            return answer, request, request, flat, touched
        if not shared:
            sparse_bytes = sum(g.indices.nbytes + g.values.nbytes for g in sparse.values())
            grad_bytes = flat.numel() if request.grads is not None else 0
            STEP_BYTES.labels("out").inc(grad_bytes + sparse_bytes)
        sending = replace(request, params_in=None) if shared else request
        return self._send_step(s, sending, flat), request, sending, flat, touched

    def _take_params(
        self,
        s: int,
        result: Any,
        request: StepRequest,
        touched: list[int],
        params: list[torch.Tensor],
    ) -> None:
        """Copies shard ``s``'s new parameters (the slots ``touched``) into the user's tensors:
        from its shared buffer, from its answer, or only the rows its sparse gradients
        touched."""
        shared_values = self.data_path.shared_params(s)
        rows = None
        if result.rows_only:  # the rows its sparse gradients touched changed, no others
            rows = {j: grad.touched_rows() for j, grad in request.sparse_grads.items()}
        if shared_values is not None:
            views = self.data_path.views(s, shared_values)
            self.shard_map.copy_back(s, shared_values, params, touched, rows=rows, views=views)
        elif result.params is not None:
            STEP_BYTES.labels("in").inc(result.params.nbytes)
            self.shard_map.copy_back(s, result.params, params, touched)
        else:  # sparse gradients that changed only their rows: those rows came back
            STEP_BYTES.labels("in").inc(sum(v.nbytes for v in result.rows.values()))
            self.shard_map.copy_rows(s, rows, result.rows, params)

    def _send_step(self, shard: int, request: StepRequest, flat: Any = None) -> Any:
        """Sends a step to a shard: through its lane where it has one and the request is
        small (no sparse gradients; on a network lane, dense gradients, sent from ``flat``,
        and no parameters written since the last step), else through Ray. Returns what to
        wait on."""
        if not request.sparse_grads:
            if not self.lanes.is_net(shard):
                lane = self.lanes.send(shard, self.handles[shard], request)
            elif request.grads is not None and request.params_in is None:
                inline = replace(request, grads=None)
                lane = self.lanes.send(shard, self.handles[shard], inline, flat)
            else:
                lane = None
            if lane is not None:
                return lane
        return self.handles[shard].step(request)

    def _step_failed(
        self,
        step_id: int,
        failures: dict[int, Exception],
        sent: dict[int, tuple[StepRequest, torch.Tensor]],
    ) -> None:
        """Raises for a step some shards refused: after rolling every shard back from its
        replica where there are replicas, else naming the shards that applied it (where none
        did, the first shard's own error, as torch's optimizer raises it)."""
        failed = sorted(failures)
        applied = sorted(set(sent) - set(failures))
        first = failures[failed[0]]
        where = f"step {step_id} failed on shard(s) {failed} ({type(first).__name__}: {first})"
        emit(
            logger, "step_failed", logging.ERROR, step=step_id, failed=failed, applied=applied,
            error=type(first).__name__, replicas=self.replicas is not None,
        )  # fmt: skip
        if self.replicas is not None:
            stuck = self.replicas.roll_back(sorted(sent))
            if not stuck:
                for s, (request, _) in sent.items():  # the user's writes the step carried
                    if request.params_in is not None:
                        ray_get(self.handle(s).set_params(request.params_in))
                self.pull_params()
                self.data_path.forget_shipped()
                note = (
                    f"shardopt: {where}; every shard was rolled back from its replica to its "
                    f"state before step {step_id}: nothing of step {step_id} is applied"
                )
                if hasattr(first, "add_note"):
                    first.add_note(note)
                logger.error(note)
                raise first
            where += f"; shard(s) {stuck} could not be rolled back from their replicas"
        if not applied:  # no shard moved on: the shards agree, as torch's optimizer would
            if hasattr(first, "add_note"):  # Python 3.11+
                first.add_note(f"shardopt: {where}; no shard applied it")
            raise first
        raise PartialStepError(
            f"{where}; shard(s) {applied} applied it, so the shards now disagree about step "
            f"{step_id} (the parameters here hold their values after it; a failed shard may "
            "have changed part of its own state). To get back to one consistent state, restore "
            "the parameters and the optimizer state saved before this step "
            "(model.load_state_dict(...) and opt.load_state_dict(...) or opt.load_checkpoint("
            "path)); with replicate=True the shards roll back by themselves.",
            step_id=step_id,
            applied=applied,
            failed=failed,
        ) from first

    # ----- parameters -----------------------------------------------------------------------

    def pull_params(self) -> None:
        params = self._params.flat()
        live = self.shard_map.live_shards()
        remote = [s for s in live if self.data_path.shared_params(s) is None]
        values = dict(zip(remote, ray_get([self.handles[s].param_values() for s in remote])))
        for s in live:
            shared = self.data_path.shared_params(s)
            self.shard_map.copy_back(s, shared if shared is not None else values[s], params)

    def push_params(self) -> None:
        params = self._params.flat()
        self.shard_map.forget_versions()
        updates = {s: self.data_path.changed_params(s, params) for s in range(self.num_shards)}
        ray_get([self.handle(s).set_params(u) for s, u in updates.items() if u is not None])

    def add_param_group(self, group_index: int) -> None:
        group = self._params.groups[group_index]
        new_params = list(group["params"])
        splittable = self._params.splittable(group_index)
        blocks = self._place(new_params, [group_index] * len(new_params), splittable)
        options = group_options(group)
        buffers = ray_get(
            [self.handle(s).add_param_group(options, blocks[s]) for s in range(self.num_shards)]
        )
        flat = self._params.flat()
        for s, shard_buffers in enumerate(buffers):
            self.data_path.map_shared(s, shard_buffers, flat)
        if self.per_tensor and self.replicas is None:  # the hosts closed their network lanes
            self._open_lanes(net_only=True)

    def status(self) -> list[ShardStatus]:
        return [
            replace(st, transport="network_lane") if self.lanes.is_net(s) else st
            for s, st in enumerate(super().status())
        ]

    # ----- inspection and lifecycle ---------------------------------------------------------

    def _checkpoint_taken(self) -> Callable[[Commit | None], None]:
        replicas, step_id = self.replicas, self._next_step_id
        if replicas is None:
            return lambda commit: None
        # the fallback when a shard and its replica are both lost
        return lambda commit: setattr(replicas, "checkpoint", (commit, step_id))

    def lost_shared_memory(self, shard: int) -> None:
        self.lanes.close(shard)
        self.data_path.map_shared(shard, None, self._params.flat())

    def detach(self) -> None:
        """Lets go of the shards without dropping them: they outlive this process (a gateway
        handing its sessions over to the next one, :mod:`shardopt.gateway.resume`)."""
        if not self._closed:
            self._closed = True
            self.lanes.close_all()
            self.data_path.close()
            self._finalizer.detach()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.lanes.close_all()
            self.data_path.close()
            self._finalizer()
            if self.replicas is not None:
                self.replicas.close()
