"""Workers of shard-group tests: a small regression model trained by one rank of a group.

Used in-process (threads) by tests/test_group.py and as Ray actors by tests/test_group_cluster.py
(``ray.remote(GroupWorker)``), so both rings train exactly the same way.
"""

from __future__ import annotations

import os
import time
from typing import Any

import helpers
import torch
from helpers import batch, loss_of

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
