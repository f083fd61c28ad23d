"""shardopt: torch.optim with the optimizer state and master parameters sharded on Ray actors.

Swap ``torch.optim.AdamW(model.parameters(), lr=1e-3)`` for
``shardopt.AdamW(model.parameters(), lr=1e-3, num_shards=2)``: same numbers, same interface.
"""

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
