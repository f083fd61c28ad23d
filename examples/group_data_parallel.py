"""Data-parallel training with one shardopt shard group shared by plain Ray actors.

    python examples/group_data_parallel.py [--workers 2] [--mode sync|async] [--steps 300]

Each rank is a Ray actor with its own copy of a small classifier (64 -> 128 -> 10) and its own
slice of scikit-learn's digits training set. Every rank builds
``shardopt.AdamW(model.parameters(), group=NAME, world_size=N, rank=r, num_shards=2, ...)``:
the first to arrive creates the group's two shard actors (they hold the master parameters and
AdamW's state), the others attach. In ``sync`` mode each ``opt.step()`` averages all ranks'
gradients on the shards, as DistributedDataParallel would, and every rank gets the same new
parameters; in ``async`` mode each rank's gradients are applied as they arrive.

With Ray Train, the body of ``Rank.train`` is a ``TorchTrainer``'s ``train_loop_per_worker``,
with the rank and world size taken from Ray Train and no DDP wrapper (the group averages)::

    def train_loop_per_worker(config):
        ctx = ray.train.get_context()
        model = make_model()
        opt = shardopt.AdamW(model.parameters(), lr=config["lr"], group=config["group"],
                             world_size=ctx.get_world_size(), rank=ctx.get_world_rank(),
                             num_shards=2)
        ...  # the same loop over this rank's data

    TorchTrainer(train_loop_per_worker, train_loop_config={"lr": 3e-3, "group": "digits"},
                 scaling_config=ScalingConfig(num_workers=2)).fit()

Starts a local Ray, or joins the cluster that ``RAY_ADDRESS`` names.
"""

from __future__ import annotations

import argparse
import os
import uuid

import ray
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import shardopt


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


class Rank:
    """One data-parallel worker: a model, a slice of the data, a member of the shard group.

    A plain class, made a Ray actor in ``main`` (one per rank).
    """

    def __init__(self, rank: int, world_size: int, group: str, mode: str, lr: float) -> None:
        self.model = make_model()
        self.opt = shardopt.AdamW(
            self.model.parameters(),
            lr=lr,
            group=group,  # the first rank to arrive creates the group, the others attach
            world_size=world_size,
            rank=rank,
            mode=mode,
            num_shards=2,
        )

    def train(self, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> list[float]:
        """``steps`` steps over shuffled minibatches of (x, y); the mean loss of each epoch."""
        per_epoch = len(x) // batch
        gen = torch.Generator().manual_seed(len(x))
        epoch_losses, losses = [], []
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(len(x), generator=gen)
            idx = order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
            self.opt.zero_grad()
            loss = nn.functional.cross_entropy(self.model(x[idx]), y[idx])
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
            if len(losses) == per_epoch or step == steps - 1:
                epoch_losses.append(sum(losses) / len(losses))
                losses = []
        return epoch_losses

    def pull(self) -> None:
        self.opt.pull_params()  # the group's latest parameters (async: others moved them)

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def same_params(self, params: list[torch.Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.model.parameters(), params))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.model(x).argmax(dim=1) == y).float().mean().item()

    def close(self) -> None:
        self.opt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="world size (default 2)")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--steps", type=int, default=300, help="steps per worker (default 300)")
    parser.add_argument("--batch", type=int, default=32, help="per worker (default 32)")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)

    # The cluster RAY_ADDRESS names, else a new local Ray (never one found by chance).
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    group = f"digits-{uuid.uuid4().hex[:8]}"
    n = args.workers
    ranks = [ray.remote(Rank).remote(r, n, group, args.mode, args.lr) for r in range(n)]
    try:
        runs = [  # rank r trains on every n-th training example, starting at r
            w.train.remote(x_train[r::n], y_train[r::n], args.steps, args.batch)
            for r, w in enumerate(ranks)
        ]
        for epoch, loss in enumerate(ray.get(runs)[0], 1):
            print(f"epoch {epoch:2d}  rank 0 train loss {loss:.4f}")
        if args.mode == "async":
            ray.get([w.pull.remote() for w in ranks])
        reference = ranks[0].params.remote()
        same = all(ray.get([w.same_params.remote(reference) for w in ranks]))
        print(f"{n} workers hold identical parameters: {same}")
        accuracy = ray.get(ranks[0].accuracy.remote(x_test, y_test))
        print(f"test accuracy: {accuracy:.2%} ({args.mode} mode, {n} workers)")
        ray.get([w.close.remote() for w in ranks])
    finally:
        shardopt.close_group(group)
        ray.shutdown()
    if not same:
        raise SystemExit("the workers' parameters differ")


if __name__ == "__main__":
    main()
