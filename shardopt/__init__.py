"""shardopt: torch.optim with the optimizer state and master parameters sharded on Ray actors.

Swap ``torch.optim.AdamW(model.parameters(), lr=1e-3)`` for
``shardopt.AdamW(model.parameters(), lr=1e-3, num_shards=2)``: same numbers, same interface.
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "shardopt.client.algorithms": (
        "ALGORITHMS", "ASGD", "LBFGS", "SGD", "Adadelta", "Adafactor", "Adagrad", "Adam",
        "Adamax", "AdamW", "Muon", "NAdam", "RAdam", "RMSprop", "Rprop", "SparseAdam",
    ),
    "shardopt.client.optimizer": ("ShardedOptimizer",),
    "shardopt.client.shard_group": ("close_group", "list_groups"),
    "shardopt.core.errors": (
        "CheckpointInUseError", "GroupTimeoutError", "OptimizerClosedError", "PartialStepError",
        "PlacementError", "QuotaExceededError", "ShardoptError", "ShardUnavailableError",
    ),
    "shardopt.core.plan": ("ShardPlan",),
}  # fmt: skip
"""Where each public name lives. They are imported when first used: a shard host's process
imports ``shardopt.actor``, and with it this package, and needs none of the client's modules
(with them its start took about 0.6 s longer)."""
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module (PEP 562); or a subpackage not yet imported."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


if TYPE_CHECKING:
    from shardopt.client.algorithms import (
        ALGORITHMS,
        ASGD,
        LBFGS,
        SGD,
        Adadelta,
        Adafactor,
        Adagrad,
        Adam,
        Adamax,
        AdamW,
        Muon,
        NAdam,
        RAdam,
        RMSprop,
        Rprop,
        SparseAdam,
    )
    from shardopt.client.optimizer import ShardedOptimizer
    from shardopt.client.shard_group import close_group, list_groups
    from shardopt.core.errors import (
        CheckpointInUseError,
        GroupTimeoutError,
        OptimizerClosedError,
        PartialStepError,
        PlacementError,
        QuotaExceededError,
        ShardoptError,
        ShardUnavailableError,
    )
    from shardopt.core.plan import ShardPlan

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ASGD",
    "LBFGS",
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "CheckpointInUseError",
    "GroupTimeoutError",
    "Muon",
    "NAdam",
    "OptimizerClosedError",
    "PartialStepError",
    "PlacementError",
    "QuotaExceededError",
    "RAdam",
    "RMSprop",
    "Rprop",
    "ShardPlan",
    "ShardUnavailableError",
    "ShardedOptimizer",
    "ShardoptError",
    "SparseAdam",
    "__version__",
    "close_group",
    "list_groups",
]
