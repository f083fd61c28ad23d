"""What ``copy`` and ``pickle`` do to a sharded optimizer.

torch.optim's optimizers copy and pickle as their three attributes (``defaults``, ``state``,
``param_groups``). A :class:`~shardopt.ShardedOptimizer`'s state lives on its shards, so that
would make a proxy with no shards behind it, or (shallow) a second proxy driving the same shards.
Instead:

- ``copy.deepcopy(opt)`` (and ``copy.deepcopy((model, opt))``, which shares one copy of each
  parameter) makes an independent optimizer, as torch's deep copy is: new shards, made with the
  options the original was made with and as many of them, over deep copies of its parameters,
  holding a copy of its state and param groups (loaded from its ``state_dict()``). A shard
  group's member cannot be copied (its rank is one process's place in the group);
- ``copy.copy``, ``pickle``, ``torch.save(opt)`` and sending it to a Ray task raise TypeError
  saying what to do instead (its ``state_dict()`` or a sharded checkpoint travels; the
  optimizer object does not). A pickle would carry a gateway's token and this cluster's
  placements to wherever it is loaded.
- ``opt.__setstate__(d)`` (code calls it to reset an optimizer:
  ``opt.__setstate__({"state": defaultdict(dict)})``) is torch's, with ``d["state"]`` assigned
  to ``opt.state``: the shards' state is replaced (torch's writes the attribute dictionary,
  which ``opt.state`` would not see).

Talks to: the optimizer it copies (its constructor, ``state_dict`` and ``load_state_dict``).
"""

from __future__ import annotations

import copy
from typing import Any

_NOT_GIVEN = object()


def made_with(arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a deep copy needs of ``ShardedOptimizer.__init__``'s arguments (its ``locals()``
    on entry): its keyword-only options and its hyperparameters."""
    skip = {"self", "params", "optimizer_class", "defaults", "__class__"}
    return {k: v for k, v in arguments.items() if k not in skip}, dict(arguments["defaults"])


class CopyRules:
    """The copy and pickle behaviour of :class:`~shardopt.ShardedOptimizer` (a mixin; see the
    module docstring). Its ``_made_with`` is what :func:`made_with` recorded."""

    _made_with: tuple[dict[str, Any], dict[str, Any]]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        opt: Any = self
        options, defaults = self._made_with
        if options.get("group") is not None:  # in the cluster or through a gateway
            raise TypeError(
                f"a shard group's member ({type(self).__name__}, group {options['group']!r}, "
                f"rank {options.get('rank')}) cannot be copied: its rank is this process's "
                "place in the group. Copy its state_dict() instead"
            )
        groups = [
            {
                **{k: copy.deepcopy(v, memo) for k, v in group.items() if k != "params"},
                "params": [copy.deepcopy(p, memo) for p in group["params"]],
            }
            for group in opt.param_groups
        ]
        state = opt.state_dict()  # before anything is made: a closed optimizer raises here
        twin = type(self).__new__(type(self))
        options = {**options, "num_shards": opt.num_shards}
        made = next(c for c in type(self).__mro__ if CopyRules in c.__bases__)  # ShardedOptimizer
        made.__init__(twin, groups, opt.optimizer_class, **options, **defaults)
        try:
            twin.load_state_dict(state)
        except BaseException:
            twin.close()
            raise
        memo[id(self)] = twin
        return twin

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        new_state = state.pop("state", _NOT_GIVEN)
        super().__setstate__(state)  # type: ignore[misc]  # torch.optim.Optimizer's
        if new_state is not _NOT_GIVEN:
            self.state = new_state  # type: ignore[attr-defined]

    def __copy__(self) -> Any:
        raise TypeError(
            f"a shallow copy of {type(self).__name__} would drive the same shards as the "
            "original: use copy.deepcopy(opt) for an independent optimizer"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled: its state and master parameters live on "
            "its shards (Ray actors, or a gateway's). Save opt.state_dict() (torch.save) or a "
            "sharded checkpoint (opt.save_checkpoint) and load it into a new optimizer; "
            "copy.deepcopy(opt) makes an independent one in this process"
        )
