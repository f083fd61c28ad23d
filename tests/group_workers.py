"""Workers of shard-group tests: a small regression model trained by one rank of a group.

Used in-process (threads) by tests/test_group.py and as Ray actors by tests/test_group_cluster.py
(``ray.remote(GroupWorker)``), so both rings train exactly the same way.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import helpers
import torch
from helpers import assert_same, assert_same_state_dict, batch, loss_of

import shardopt

SIZES = (6, 8, 2)
"""The layer widths of every rank's model (:func:`helpers.make_model` of them)."""


def make_model(seed: int = 0) -> torch.nn.Module:
    """The group tests' model, seeded with ``seed``."""
    return helpers.make_model(seed, SIZES)


def make_data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of the group tests' data: :func:`helpers.batch` of ``seed``."""
    return batch(seed, n)


def reference_run(steps: int, x: torch.Tensor, y: torch.Tensor, **hyper: Any) -> list[torch.Tensor]:
    """One plain torch.optim.AdamW worker on the whole batch (fused, as the shards run it)."""
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def sync_reference(
    steps: int, halves: list[tuple[torch.Tensor, torch.Tensor]], **hyper: Any
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """A sync group's run computed here, without Ray: each rank's gradients on its half, summed
    in rank order and divided by the world size (as a round does), then fused AdamW. Returns
    the parameters and the optimizer's state_dict after ``steps`` rounds."""
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    for _ in range(steps):
        grads = []
        for x, y in halves:
            model.zero_grad()
            loss_of(model, x, y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for j, p in enumerate(model.parameters()):
            total = grads[0][j].clone()
            for rank_grads in grads[1:]:
                total.add_(rank_grads[j])
            p.grad = total.div_(len(halves))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


class GroupWorker:
    """One rank: its own copy of the model, attached to a shard group."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.opt: shardopt.ShardedOptimizer | None = None
        self.pushes: list[tuple[int, int, int | None, int]] = []
        self.step_times: list[float] = []  # time.time() after each step
        self.participants: list[tuple[int, ...]] = []  # each step's participants (sync)

    def attach(self, seed: int = 0, **options: Any) -> list[torch.Tensor]:
        """Builds the model from ``seed`` and joins the group; returns the adopted parameters."""
        self.model = make_model(seed)
        self.opt = shardopt.AdamW(self.model.parameters(), **options)
        self.pushes = []
        return self.params()

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def train(
        self, x: torch.Tensor, y: torch.Tensor, steps: int, use_closure: bool = False
    ) -> list[torch.Tensor]:
        """``steps`` steps on (x, y); records every shard's answer to every push."""
        for _ in range(steps):
            if use_closure:

                def closure() -> torch.Tensor:
                    self.opt.zero_grad()
                    loss = loss_of(self.model, x, y)
                    loss.backward()
                    return loss

                self.opt.step(closure)
            else:
                self.opt.zero_grad()
                loss_of(self.model, x, y).backward()
                self.opt.step()
            for r in self.opt.group.last_push:
                self.pushes.append((r.shard_index, r.read_version, r.applied_version, r.rank))
            self.step_times.append(time.time())
            self.participants.append(self.opt.group.participants)
        return self.params()

    def rank(self) -> int:
        return self.opt.group.rank

    def history(self) -> tuple[list[float], list[tuple[int, ...]]]:
        """Each step's end time and participants."""
        return list(self.step_times), list(self.participants)

    def pid(self) -> int:
        return os.getpid()

    def push_log(self) -> list[tuple[int, int, int | None, int]]:
        """(shard, read version, applied version or None, rank) of every push's final answer."""
        return list(self.pushes)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def lanes(self) -> tuple[int, int]:
        """(open push lanes, of which network lanes) of this worker."""
        lanes = self.opt.group.lanes
        return len(lanes), lanes.net

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def close(self) -> None:
        if self.opt is not None:
            self.opt.close()
            self.opt = None


# ----- users' loops, and a group computed with plain torch ----------------------------------------

STEPS = 5
"""How many steps the users' loops below run."""
INF_STEP = 2
"""The step whose gradients overflow (on the ranks a test chooses)."""


def user_batches(
    rank: int, inf_ranks: tuple[int, ...] = ()
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s minibatch of every step; at INF_STEP those of ``inf_ranks`` overflow."""
    out = []
    for k in range(STEPS):
        x, y = batch(100 * rank + k, n=4)
        if k == INF_STEP and rank in inf_ranks:
            x[0, 0] = float("inf")
        out.append((x, y))
    return out


def grad_scaler() -> torch.amp.GradScaler:
    """A CPU GradScaler whose scale grows every second step without an inf (and halves on one)."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)


def halving(opt: torch.optim.Optimizer) -> Any:
    """An lr scheduler that changes every group's lr at every step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)


def scaled_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    clip: bool,
    scheduler: Any = None,
) -> list[tuple[list[torch.Tensor], float, float]]:
    """GradScaler's standard loop (scale, backward, [unscale_, clip_grad_norm_], step, update,
    [scheduler.step()]) over ``batches``; returns (parameters, scale, lr) after each step."""
    trajectory = []
    for x, y in batches:
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        params = [p.detach().clone() for p in model.parameters()]
        trajectory.append((params, scaler.get_scale(), opt.param_groups[0]["lr"]))
    return trajectory


def scaled_sync_run(
    make_member: Any, clip: bool, lr: float, inf_ranks: tuple[int, ...] = (0, 1)
) -> tuple[list[shardopt.ShardedOptimizer], ReferenceGroup]:
    """Two sync workers (threads), each ``make_member(model, rank)`` running GradScaler's loop
    (:func:`scaled_steps`, a :func:`halving` lr) on its :func:`user_batches`, those of
    ``inf_ranks`` overflowing at INF_STEP (they vote to skip that round, which then updates
    nothing); checks every step against a :class:`ReferenceGroup` running fused AdamW (what
    the shards run) and returns the workers' optimizers and the reference."""
    data = [user_batches(r, inf_ranks=inf_ranks) for r in range(2)]

    def work(rank: int) -> tuple[shardopt.ShardedOptimizer, list]:
        model = make_model(0)
        opt = make_member(model, rank)
        return opt, scaled_steps(model, opt, grad_scaler(), data[rank], clip, halving(opt))

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    reference = ReferenceGroup(2, "sync", lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True))
    members = [reference.member(r) for r in range(2)]
    scalers, schedulers = [grad_scaler(), grad_scaler()], [halving(m) for m in members]

    def step(r: int, k: int) -> tuple:
        done = scaled_steps(
            reference.models[r], members[r], scalers[r], data[r][k : k + 1], clip, schedulers[r]
        )[0]
        if k == INF_STEP and r in inf_ranks:  # its scaler skipped the member's step: the vote
            reference.push(r, None)
        return done

    want = in_lockstep(reference, step)
    assert reference.rounds == STEPS - 1
    for r in range(2):  # the reference skipped; the scales of ranks that found no inf grew
        halved = want[r][INF_STEP][1] == want[r][INF_STEP - 1][1] / 2
        assert halved == (r in inf_ranks)
    assert_same_runs([trajectory for _, trajectory in results], want)
    return [opt for opt, _ in results], reference


def in_lockstep(reference: ReferenceGroup, step: Any) -> list[list]:
    """The reference's two sync ranks, step by step: ``step(rank, k)`` gives (_, scale, lr);
    each rank's parameters are read once the round is complete."""
    runs: list[list] = [[], []]
    for k in range(STEPS):
        done = [step(r, k) for r in range(2)]
        for r, (_, scale, lr) in enumerate(done):
            params = [p.detach().clone() for p in reference.models[r].parameters()]
            runs[r].append((params, scale, lr))
    return runs


def plain_reference_run(
    data: list[list[tuple[torch.Tensor, torch.Tensor]]], make_scheduler: Any, lr: float
) -> tuple[ReferenceGroup, list[list]]:
    """A sync :class:`ReferenceGroup` of two ranks (fused AdamW, lr ``lr``) stepping on their
    ``data`` in lockstep, each with ``make_scheduler(member)`` stepped after every step: the
    reference and each rank's (parameters, 1.0, lr) after every step."""
    reference = ReferenceGroup(2, "sync", lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True))
    members = [reference.member(r) for r in range(2)]
    schedulers = [make_scheduler(m) for m in members]

    def step(r: int, k: int) -> tuple:
        members[r].zero_grad()
        loss_of(reference.models[r], *data[r][k]).backward()
        members[r].step()
        schedulers[r].step()
        return None, 1.0, members[r].param_groups[0]["lr"]

    return reference, in_lockstep(reference, step)


def assert_same_runs(got: list[list], want: list[list]) -> None:
    """Each rank's (parameters, scale, lr) after every step, bit for bit."""
    for rank, (mine, ref) in enumerate(zip(got, want)):
        for k, ((params, scale, lr), (ref_params, ref_scale, ref_lr)) in enumerate(zip(mine, ref)):
            assert (scale, lr) == (ref_scale, ref_lr), (rank, k)
            assert_same(params, ref_params, f"rank {rank} step {k}")


def assert_group_state(opt: torch.optim.Optimizer, reference: ReferenceGroup, rank: int) -> None:
    """``opt``'s state dict is the reference group's as rank ``rank`` sees it."""
    got, want = opt.state_dict(), reference.state_dict(rank)
    for group in got["param_groups"] + want["param_groups"]:
        group.pop("fused")  # shardopt reports the user's choice (None), not the kernel it ran
    assert_same_state_dict(got, want)


class ReferenceGroup:
    """A shard group computed here with plain torch, for bit-exact comparisons: one torch
    optimizer over the group's parameters (the shards) and one :meth:`member` optimizer per
    rank, whose ``step()`` hands the rank's gradients to it as a group member pushes them.

    ``"sync"``: a round applies the rank-order sum of all ranks' gradients divided by the world
    size, with the lowest rank's hyperparameters, and every rank adopts the result. ``"async"``:
    each push is applied as it is and only the pushing rank adopts the result. A member is a
    plain optimizer to GradScaler (it unscales the gradients and skips the step on an inf), as
    a group member is.
    """

    def __init__(self, world_size: int, mode: str, make_optimizer: Any, seed: int = 0) -> None:
        self.world_size, self.mode = world_size, mode
        self.server = make_model(seed)
        self.optimizer: torch.optim.Optimizer = make_optimizer(self.server.parameters())
        self.models = [make_model(seed) for _ in range(world_size)]
        self._round: dict[int, tuple[list[torch.Tensor], dict[str, Any]]] = {}
        self._members: dict[int, torch.optim.Optimizer] = {}
        self.rounds = 0

    def member(self, rank: int) -> torch.optim.Optimizer:
        """Rank ``rank``'s optimizer (its param group holds ``lr`` and ``betas``)."""
        hyper = {k: v for k, v in self.optimizer.defaults.items() if k in ("lr", "betas")}
        self._members[rank] = _Member(self, rank, self.models[rank].parameters(), hyper)
        return self._members[rank]

    def state_dict(self, rank: int) -> dict[str, Any]:
        """The group's state dict as rank ``rank`` sees it: the shards' state, its own
        hyperparameters (a worker's ``param_groups`` are its own, as a scheduler left them)."""
        own = {k: v for k, v in self._members[rank].param_groups[0].items() if k != "params"}
        state = self.optimizer.state_dict()
        state["param_groups"][0].update(own)
        return state

    @torch.no_grad()
    def push(self, rank: int, member: torch.optim.Optimizer | None) -> None:
        """Rank ``rank``'s gradients into the round (``member`` None: a sync rank whose
        GradScaler found an inf votes to skip the round: no update, every rank adopts the
        parameters as they are)."""
        if member is None:
            self._round[rank] = None
        else:
            grads = [p.grad.clone() for p in self.models[rank].parameters()]
            options = {k: v for k, v in member.param_groups[0].items() if k != "params"}
            self._round[rank] = (grads, options)
        if self.mode == "sync" and len(self._round) < self.world_size:
            return
        ranks = sorted(self._round)
        if all(self._round[r] is not None for r in ranks):
            self.optimizer.param_groups[0].update(self._round[ranks[0]][1])
            for j, p in enumerate(self.server.parameters()):
                total = self._round[ranks[0]][0][j].clone()
                for r in ranks[1:]:
                    total.add_(self._round[r][0][j])
                p.grad = total.div_(len(ranks)) if self.mode == "sync" else total
            self.optimizer.step()
            self.rounds += 1
        for r in ranks:
            for mine, shard in zip(self.models[r].parameters(), self.server.parameters()):
                mine.copy_(shard)
        self._round = {}


class _Member(torch.optim.Optimizer):
    def __init__(self, group: ReferenceGroup, rank: int, params: Any, hyper: dict) -> None:
        super().__init__(params, hyper)
        self._reference, self._rank = group, rank

    def step(self, closure: Any = None) -> None:
        self._reference.push(self._rank, self)
