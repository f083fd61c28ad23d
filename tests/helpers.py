"""Test helpers used across the suite: a small model, one training step, exact comparisons.

Every comparison here is bit-exact (``rtol=0, atol=0``): shardopt runs torch's own kernels.
"""

from __future__ import annotations

import torch
from torch import nn


def make_model(seed: int = 0) -> nn.Module:
    """A three-layer MLP (6 -> 9 -> 5 -> 2) with seeded weights: six tensors of four sizes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 2))


def batch(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded minibatch for :func:`make_model`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 2, generator=gen)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    return nn.functional.mse_loss(model(x), y)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> torch.Tensor:
    """zero_grad, forward, backward and step on the minibatch of ``seed``."""
    opt.zero_grad()
    loss = loss_of(model, seed)
    loss.backward()
    opt.step()
    return loss.detach()


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_tensors(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i: f"tensor {i}: {m}")


def assert_same_state_dict(got: dict, want: dict) -> None:
    """Equal groups, the same state keys in the same order, identical values."""
    assert got["param_groups"] == want["param_groups"]
    assert list(got["state"]) == list(want["state"])
    for pid, state in want["state"].items():
        assert list(got["state"][pid]) == list(state), pid
        for key, value in state.items():
            other = got["state"][pid][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(other, value, rtol=0, atol=0)
            else:
                assert other == value
