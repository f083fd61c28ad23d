"""``shardopt.<Name>`` for every ``torch.optim`` algorithm: torch's signature, sharded.

Each class takes exactly the positional and keyword arguments of ``torch.optim.<Name>`` (same
defaults), plus the keyword-only sharding options of :class:`~shardopt.ShardedOptimizer`
(``num_shards``, ``actor_options``), and is a :class:`~shardopt.ShardedOptimizer` over
``torch.optim.<Name>``.

Example:
    >>> import torch, shardopt
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = shardopt.AdamW(model.parameters(), lr=1e-3, num_shards=2)
    >>> model(torch.randn(8, 4)).sum().backward()
    >>> opt.step()
    >>> opt.close()

Talks to: :mod:`shardopt.client.optimizer` only.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from shardopt.client.lbfgs import LBFGS
from shardopt.client.optimizer import ShardedOptimizer

_SHARDING_OPTIONS = [
    p
    for p in inspect.signature(ShardedOptimizer.__init__).parameters.values()
    if p.kind == p.KEYWORD_ONLY
]
"""ShardedOptimizer's keyword-only options (sharding, groups, placement), on every class."""
_SHARDING_NAMES = frozenset(p.name for p in _SHARDING_OPTIONS)


def _sharded(torch_class: type[torch.optim.Optimizer]) -> type[ShardedOptimizer]:
    """A ShardedOptimizer subclass with ``torch_class``'s constructor signature."""
    signature = inspect.signature(torch_class.__init__)

    def __init__(self: ShardedOptimizer, params: Any, *args: Any, **kwargs: Any) -> None:
        sharding = {k: kwargs.pop(k) for k in list(kwargs) if k in _SHARDING_NAMES}
        try:
            bound = signature.bind(self, params, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{torch_class.__name__}.__init__(): {err}") from None
        hyperparameters = {k: v for k, v in bound.arguments.items() if k not in ("self", "params")}
        ShardedOptimizer.__init__(self, params, torch_class, **sharding, **hyperparameters)

    parameters = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    __init__.__signature__ = signature.replace(parameters=parameters + _SHARDING_OPTIONS)
    name = torch_class.__name__
    __init__.__qualname__ = f"{name}.__init__"
    doc = (
        f"``torch.optim.{name}`` with its state and master parameters sharded on Ray actors.\n\n"
        f"Same arguments and defaults as ``torch.optim.{name}``, plus the keyword-only "
        "options of :class:`~shardopt.ShardedOptimizer` (``num_shards``, ``group``, ...)."
    )
    return type(
        name,
        (ShardedOptimizer,),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name},
    )


SGD = _sharded(torch.optim.SGD)
Adam = _sharded(torch.optim.Adam)
AdamW = _sharded(torch.optim.AdamW)
Adadelta = _sharded(torch.optim.Adadelta)
Adagrad = _sharded(torch.optim.Adagrad)
Adamax = _sharded(torch.optim.Adamax)
ASGD = _sharded(torch.optim.ASGD)
NAdam = _sharded(torch.optim.NAdam)
RAdam = _sharded(torch.optim.RAdam)
RMSprop = _sharded(torch.optim.RMSprop)
Rprop = _sharded(torch.optim.Rprop)
Adafactor = _sharded(torch.optim.Adafactor)
Muon = _sharded(torch.optim.Muon)
SparseAdam = _sharded(torch.optim.SparseAdam)


ALGORITHMS = (
    SGD,
    Adam,
    AdamW,
    Adadelta,
    Adagrad,
    Adamax,
    ASGD,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
    Adafactor,
    Muon,
    SparseAdam,
)
"""Every per-tensor algorithm shardopt shards (LBFGS, which is not per-tensor, is separate)."""

__all__ = [c.__name__ for c in ALGORITHMS] + ["ALGORITHMS", "LBFGS"]
