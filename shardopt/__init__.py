"""shardopt: torch.optim with the optimizer state and master parameters sharded on Ray actors.

Swap ``torch.optim.AdamW(model.parameters(), lr=1e-3)`` for
``shardopt.AdamW(model.parameters(), lr=1e-3, num_shards=2)``: same numbers, same interface.
"""

from shardopt.algorithms import (
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
from shardopt.errors import (
    GroupTimeoutError,
    OptimizerClosedError,
    PlacementError,
    QuotaExceededError,
    ShardoptError,
    ShardUnavailableError,
)
from shardopt.group import close_group, list_groups
from shardopt.optimizer import ShardedOptimizer
from shardopt.plan import ShardPlan

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
    "GroupTimeoutError",
    "Muon",
    "NAdam",
    "OptimizerClosedError",
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
