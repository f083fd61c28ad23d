"""Parameters whose dtype or shape changed under the optimizer, or that were added to or removed
from its param groups' lists, and what the shards do about it.

torch.optim holds the user's tensors themselves. Converting a model after its optimizer was made
(``model.half()``, ``model.to(torch.bfloat16)``, ``model.double()``; Lightning Fabric's
``"bf16-true"`` and ``"16-true"`` precisions convert the module inside ``fabric.setup(model,
optimizer)``), or giving a parameter data of another shape (``p.data = ...``), changes what
torch's next step updates: a parameter with no state yet is updated in its new dtype and shape,
its state made to match; one that has state makes torch's step fail (Adam's moments no longer
fit it: ``RuntimeError``).

The shards hold a master copy of each parameter in the form it had when it was placed. Left
alone they would go on updating that copy and write it back rounded into the new tensor (a
bfloat16 model updated in float32, with other numbers than torch's and float32 state), or fail
deep in a shard on the shape. So before a step, and before state is loaded, the proxy compares
every parameter's dtype and shape with what it placed and, where one changed:

- if that parameter has optimizer state (``shardopt.LBFGS``: if there is any state), or the
  optimizer is a shard group's member (its parameters are what every worker agreed on when the
  group formed), it raises RuntimeError before anything is sent, naming the parameter and both
  forms, and the shards stay as they were;
- else it re-places the optimizer: new shards (or a new gateway session) made with the same
  options and shard count over the parameters as they are now, the other parameters' state and
  the param groups carried over, then the old shards released. From there the numbers are
  torch's.

The same holds for the param groups' lists themselves: code that appends a tensor to
``optimizer.param_groups[0]["params"]`` (rather than calling ``add_param_group``), removes one,
or replaces a group's list has torch update exactly the tensors listed from the next step. The
proxy compares the listed tensors with those it placed (by identity, group by group) and
re-places the shards over the lists as they are, the state of every tensor still listed
carried over (a removed tensor's state is dropped, with a warning: torch keeps it but neither
steps it nor can put it in a state dict). LBFGS with state, and a shard group's member, refuse
as above.

Talks to: the optimizer it is mixed into (:class:`~shardopt.ShardedOptimizer`: its parameters,
backend and ``_make_backend``) and, through the backends, the shards.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

logger = logging.getLogger(__name__)

Form = tuple[torch.dtype, torch.Size]
"""What the shards' master copy of a parameter was made as: its dtype and shape."""


def form_of(param: torch.Tensor) -> Form:
    return param.dtype, param.shape


def describe(form: Form) -> str:
    """``float32 [4, 16]``."""
    return f"{str(form[0]).removeprefix('torch.')} {list(form[1])}"


class FormRules:
    """What :class:`~shardopt.ShardedOptimizer` does when its parameters change dtype or shape,
    or its param groups' lists of parameters change (a mixin; see the module docstring)."""

    _forms: list[Form]
    _placed_groups: list[dict[str, Any]]
    _placed_members: list[torch.Tensor]
    _placed_sizes: list[int]
    _placed_with: dict[str, Any]

    def _note_forms(self, options: dict[str, Any] | None = None) -> None:
        """Records the form of each parameter placed since the last call (all of them the
        first time), the param groups as placed, and with ``options`` what the backend was
        made with."""
        opt: Any = self
        if options is not None:
            self._placed_with, self._forms = options, []
        params = opt._params.flat()
        self._forms.extend(form_of(p) for p in params[len(self._forms) :])
        self._placed_groups = [{**g, "params": list(g["params"])} for g in opt.param_groups]
        self._placed_members = [p for g in self._placed_groups for p in g["params"]]
        self._placed_sizes = [len(g["params"]) for g in self._placed_groups]

    def _follow_forms(self, forms: bool = True) -> None:
        """Re-places the shards if a parameter changed form, or the param groups' parameters
        changed, and no changed parameter has state; refuses (RuntimeError) if one has. Does
        nothing where nothing changed. With ``forms=False`` (reading state: torch's is as it
        was) changed forms alone do nothing.

        Raises:
            RuntimeError: a changed parameter has optimizer state, or this is a shard group's
                member.
            OptimizerClosedError: the optimizer was closed.
        """
        opt: Any = self
        opt._check_open()
        params = opt._params.flat()
        members, placed_sizes = self._placed_members, self._placed_sizes
        sizes = [len(g["params"]) for g in opt.param_groups]
        if sizes == placed_sizes and all(p is q for p, q in zip(params, members)):
            placed = list(range(len(params)))  # every parameter where it was placed
        else:
            where = {id(p): pid for pid, p in enumerate(members)}
            placed = [where.get(id(p)) for p in params]
        changed = [  # placed ids of those that changed form
            old
            for p, old in zip(params, placed)
            if old is not None
            and (p.dtype is not self._forms[old][0] or p.shape != self._forms[old][1])
        ]
        moved = sizes != placed_sizes or placed != list(range(len(members)))
        if not moved and (not changed or not forms):
            return
        old = opt._backend
        with opt._params.pinned(self._placed_groups):  # the old shards' ids
            opt._handouts.settle(old)  # state changed in place goes to the shards it came from
        with_state = set(old.state_order)
        lbfgs_state = bool(with_state) and not opt._local_backend.per_tensor
        if lbfgs_state:  # LBFGS: one state for all parameters
            with_state = set(changed)
        stateful = [pid for pid in changed if pid in with_state]
        if changed:
            pid = (stateful or changed)[0]
            others = len(changed) - 1
            what = (
                f"parameter {pid} is {describe(form_of(members[pid]))} now but its shards hold "
                f"it as {describe(self._forms[pid])} (changed after the optimizer was made"
                + (f"; {others} more changed)" if others else ")")
            )
        else:
            added = sum(pid is None for pid in placed)
            removed = len(set(range(len(members))) - set(placed))
            what = (
                "the parameters in param_groups changed after the optimizer was made "
                f"({added} added, {removed} removed, or moved between groups)"
            )
        if self._placed_with.get("group") is not None:
            raise RuntimeError(
                f"{what}: a shard group's parameters are fixed when the group forms. Convert the "
                "model, or change the param groups, before making the optimizer, in every worker"
            )
        if moved and lbfgs_state:
            raise RuntimeError(
                f"{what}: LBFGS's state is one vector over all its parameters, made for the old "
                "ones. Make a new optimizer for the new parameters"
            )
        if stateful:
            raise RuntimeError(
                f"{what}, and its optimizer state was made for the old form (torch.optim's step "
                "fails on such state, or mixes the two forms). Convert the model before making "
                "the optimizer (or before its first step), or make a new optimizer and load a "
                "state dict into it"
            )
        self._replace_shards(old, params, placed, what)

    def _replace_shards(
        self, old: Any, params: list[torch.Tensor], placed: list[int | None], what: str
    ) -> None:
        """New shards over ``params`` as they are (``placed``: each one's id on ``old``, None
        for a new one), with ``old``'s state; then ``old`` closed. If that fails (a gateway's
        session quota, say), ``old`` stays as it was."""
        opt: Any = self
        with opt._params.pinned(self._placed_groups):  # read by the old shards' ids
            state = old.gathered_state()
        new_id = {pid: i for i, pid in enumerate(placed) if pid is not None}
        dropped = sorted(set(state) - set(new_id))
        carried = {
            new_id[pid]: state[pid] for pid in old.state_order if pid in new_id and pid in state
        }
        options = {**self._placed_with, "num_shards": old.num_shards}
        new = None
        try:
            new = opt._make_backend(opt._params, **options)
            if carried:
                new.load_state(carried, opt._params.options())
        except Exception as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(
                    f"shardopt was re-placing the shards for the parameters as they are now "
                    f"({what}); the shards are as they were: make such changes before making "
                    "the optimizer to avoid this"
                )
            if new is not None:
                new.close()
            raise
        opt._backend = new
        opt._state_reads.changed()
        self._forms = []
        self._note_forms()
        if dropped:
            warnings.warn(
                f"{what}: the optimizer state of the {len(dropped)} parameter(s) removed "
                f"(ids {dropped} as they were) is dropped, as the param groups no longer hold "
                "them",
                stacklevel=4,
            )
        logger.info(
            "parameters changed before they had state: re-placed on %d new shards (%s; %s)",
            new.num_shards,
            type(new).__name__,
            what,
        )
        old.close()
