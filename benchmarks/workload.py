"""What the benchmarks step: transformer-shaped parameters, the algorithms, mixed-shape params.

Shared by ``step_bench.py`` (the configurations that step in the benchmark's own process),
``anchors.py`` (those that run in processes of their own), ``grpc_bench.py``, and
``state_dict_bench.py`` / ``checkpoint_bench.py`` (:func:`mixed_params`). How the steps are timed
and probed is :mod:`common`'s. It imports neither Ray nor shardopt, so the child processes start
quickly.

Talks to: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as every configuration runs it, and the bytes one step must move per param."""

    label: str
    optimizer_class: type[torch.optim.Optimizer]
    hyperparameters: dict[str, Any]
    bytes_per_param: int
    bytes_note: str


ALGORITHMS: dict[str, Algorithm] = {
    "adamw": Algorithm(
        "AdamW",
        torch.optim.AdamW,
        {"lr": 1e-3, "weight_decay": 1e-2},
        28,
        "read p, g, m, v; write p, m, v",
    ),
    "sgd": Algorithm(
        "SGD(momentum=0.9)",
        torch.optim.SGD,
        {"lr": 1e-2, "momentum": 0.9},
        20,
        "read p, g, buf; write p, buf",
    ),
}


def transformer_shapes(num_params: int, layers: int = 2) -> list[tuple[str, Shape]]:
    """Parameter shapes of a small decoder with about ``num_params`` floats (never more).

    An embedding takes about 40% of the floats; each layer has four big matrices (qkv, proj,
    fc1, fc2: ``12 * width**2`` floats) and eight vectors (their biases, two LayerNorms); a
    final LayerNorm closes the list. The width is the largest multiple of 16 that keeps the
    layers to about 60% of the floats; the embedding's rows take up the rest.

    Raises:
        ValueError: ``num_params`` is too small for one embedding row.

    Example:
        >>> sum(math.prod(s) for _, s in transformer_shapes(100_000))
        99984
    """
    width = max(16, 16 * int(math.sqrt(0.6 * num_params / (12 * layers)) // 16))
    w = width
    per_layer = [
        ("attn.qkv.weight", (3 * w, w)),
        ("attn.qkv.bias", (3 * w,)),
        ("attn.proj.weight", (w, w)),
        ("attn.proj.bias", (w,)),
        ("ln1.weight", (w,)),
        ("ln1.bias", (w,)),
        ("mlp.fc1.weight", (4 * w, w)),
        ("mlp.fc1.bias", (4 * w,)),
        ("mlp.fc2.weight", (w, 4 * w)),
        ("mlp.fc2.bias", (w,)),
        ("ln2.weight", (w,)),
        ("ln2.bias", (w,)),
    ]
    body = [(f"layers.{i}.{name}", shape) for i in range(layers) for name, shape in per_layer]
    body += [("norm.weight", (w,)), ("norm.bias", (w,))]
    rows = (num_params - count_params(body)) // w
    if rows < 1:
        raise ValueError(f"num_params={num_params} is too small for {layers} layers of width {w}")
    return [("embed.weight", (rows, w)), *body]


def count_params(shapes: list[tuple[str, Shape]]) -> int:
    """How many floats parameters of these shapes hold."""
    return sum(math.prod(shape) for _, shape in shapes)


def make_params(shapes: list[tuple[str, Shape]], seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters of these shapes with fixed random values and their gradients already set."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape).normal_(0.0, 0.02, generator=gen))
        p.grad = torch.empty(shape).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Independent copies of parameters and their gradients."""
    clones = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        clones.append(q)
    return clones


def greedy_owners(sizes: list[int], parts: int) -> list[int]:
    """Largest first onto the least-loaded part (as ZeroRedundancyOptimizer and shardopt do)."""
    load = [0] * parts
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owners[i] = min(range(parts), key=lambda k: (load[k], k))
        load[owners[i]] += sizes[i]
    return owners


def mixed_params(n: int) -> list[torch.nn.Parameter]:
    """About ``n`` float32 parameters of mixed shapes, fixed random values, no gradients.

    A vector of ``n / 4``, a column of ``n / 8`` and four matrices of 1000 rows share the floats:
    the workload whose AdamW state ``state_dict_bench.py`` gathers and ``checkpoint_bench.py``
    saves.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = [(n // 4,), (n // 8, 1)] + [(1000, (n * 5 // 8) // 1000 // 4)] * 4
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
