"""Parameters whose dtype or shape changed under the optimizer, and what the shards do about it.

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

Talks to: the optimizer it is mixed into (:class:`~shardopt.ShardedOptimizer`: its parameters,
backend and ``_make_backend``) and, through the backends, the shards.
"""

from __future__ import annotations

import logging
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
    """What :class:`~shardopt.ShardedOptimizer` does when its parameters change dtype or shape
    (a mixin; see the module docstring)."""

    _forms: list[Form]
    _placed_with: dict[str, Any]

    def _note_forms(self, options: dict[str, Any] | None = None) -> None:
        """Records the form of each parameter placed since the last call (all of them the
        first time), and with ``options`` what the backend was made with."""
        opt: Any = self
        if options is not None:
            self._placed_with, self._forms = options, []
        params = opt._params.flat()
        self._forms.extend(form_of(p) for p in params[len(self._forms) :])

    def _follow_forms(self) -> None:
        """Re-places the shards if a parameter changed form and none of the changed ones has
        state; refuses (RuntimeError) if one has. Does nothing where none changed.

        Raises:
            RuntimeError: a changed parameter has optimizer state, or this is a shard group's
                member.
            OptimizerClosedError: the optimizer was closed.
        """
        opt: Any = self
        opt._check_open()
        params = opt._params.flat()
        changed = [
            pid
            for pid, (p, (dtype, shape)) in enumerate(zip(params, self._forms))
            if p.dtype is not dtype or p.shape != shape
        ]
        if not changed:
            return
        old = opt._backend
        with_state = set(old.state_order)
        if not opt._local_backend.per_tensor:  # LBFGS: one state for all parameters
            with_state = set(changed) if with_state else set()
        stateful = [pid for pid in changed if pid in with_state]
        pid = (stateful or changed)[0]
        others = len(changed) - 1
        what = (
            f"parameter {pid} is {describe(form_of(params[pid]))} now but its shards hold it as "
            f"{describe(self._forms[pid])} (changed after the optimizer was made"
            + (f"; {others} more changed)" if others else ")")
        )
        if self._placed_with.get("group") is not None:
            raise RuntimeError(
                f"{what}: a shard group's parameters are fixed when the group forms. Convert the "
                "model before making the optimizer, in every worker"
            )
        if stateful:
            raise RuntimeError(
                f"{what}, and its optimizer state was made for the old form (torch.optim's step "
                "fails on such state, or mixes the two forms). Convert the model before making "
                "the optimizer (or before its first step), or make a new optimizer and load a "
                "state dict into it"
            )
        self._replace_shards(old, params, what)

    def _replace_shards(self, old: Any, params: list[torch.Tensor], what: str) -> None:
        """New shards over ``params`` as they are, with ``old``'s state; then ``old`` closed.
        If that fails (a gateway's session quota, say), ``old`` stays as it was."""
        opt: Any = self
        state: dict[int, Any] = {}
        for part in old.state_parts():
            state.update(part)
        order = [pid for pid in old.state_order if pid in state]
        options = {**self._placed_with, "num_shards": old.num_shards}
        new = None
        try:
            new = opt._make_backend(opt._params, **options)
            if state:
                new.load_state({pid: state[pid] for pid in order}, opt._params.options())
        except Exception as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(
                    f"shardopt was re-placing the shards in the parameters' new form ({what}); "
                    "they are as they were: convert the model before making the optimizer to "
                    "avoid this"
                )
            if new is not None:
                new.close()
            raise
        opt._backend = new
        opt._state_reads.changed()
        self._forms = [form_of(p) for p in params]
        logger.info(
            "parameters changed dtype or shape before they had state: re-placed on %d new "
            "shards (%s)",
            new.num_shards,
            type(new).__name__,
        )
        old.close()
