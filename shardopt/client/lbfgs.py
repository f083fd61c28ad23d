"""Sharded LBFGS: torch.optim.LBFGS's algorithm with its flat vectors split across the shards.

torch's LBFGS treats all parameters as one flat vector: every dot product, norm and curvature test
is global. Here the proxy drives the algorithm and the closure (on the client, exactly as often as
torch calls it); each shard keeps its slice of every flat vector (the direction, the previous
gradient, the s/y history) in a :class:`shardopt.actor.vectors.VectorStore` and returns partial
reductions. Only scalars, the gradients pushed in and the parameters pulled back cross the network.

The step is a line-by-line port of ``torch.optim.LBFGS.step`` over :class:`ShardedVector`, and the
strong-Wolfe line search is torch's own ``_strong_wolfe``, which runs unchanged on these vectors.
Elementwise operations are queued and sent with the next reduction, one round trip per shard.

:class:`LBFGSShards` is a :class:`~shardopt.client.local.LocalShards` backend that runs this
algorithm instead of per-tensor steps; :class:`LBFGS` is the proxy with torch's signature that
chooses it (its one seam: ``ShardedOptimizer._local_backend``).

Talks to: the shards' vector stores through :mod:`shardopt.client.vector_machine`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.optim.lbfgs import _strong_wolfe

from shardopt.checkpoint import format as checkpoint
from shardopt.checkpoint.format import SaveHandle
from shardopt.client import checkpoints
from shardopt.client.backend import ParamSource
from shardopt.client.local import LocalShards
from shardopt.client.optimizer import ShardedOptimizer
from shardopt.client.vector_machine import ShardedVector, VectorMachine
from shardopt.core.amp import AmpScaling
from shardopt.core.buffers import readonly_tensor, to_numpy
from shardopt.core.param_groups import group_options

_VECTOR_KEYS = ("d", "old_dirs", "old_stps", "prev_flat_grad")


def _check_history(state: dict[str, Any], history_size: Any) -> None:
    """A loaded LBFGS history must be one torch's step can go on from: ``old_dirs``,
    ``old_stps`` and ``ro`` equally long, no longer than ``history_size`` (torch trims only
    when the length equals it: a longer one would grow by two vectors every iteration), and
    ``al`` long enough for the next iteration. torch takes any and fails, or grows, later.

    Raises:
        ValueError: a history that breaks these.
    """
    lists = {k: state[k] for k in ("old_dirs", "old_stps", "ro") if isinstance(state.get(k), list)}
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in lists.items())
        raise ValueError(f"loaded state dict has an LBFGS history of unequal lengths ({sizes})")
    length = lengths.pop() if lengths else 0
    if isinstance(history_size, int) and length > history_size:
        raise ValueError(
            f"loaded state dict has an LBFGS history of {length} entries; its group's "
            f"history_size is {history_size}"
        )
    al = state.get("al")
    needed = min(length + 1, history_size) if isinstance(history_size, int) else length
    if isinstance(al, list) and len(al) < needed:
        raise ValueError(
            f"loaded state dict has an LBFGS 'al' of {len(al)} entries; {needed} are needed"
        )


class LBFGSShards(LocalShards):
    """LBFGS's backend: the shards hold slices of its flat vectors (see the module docstring)."""

    per_tensor = False
    kind = "lbfgs"

    def __init__(self, params: ParamSource, num_shards: int, **options: Any) -> None:
        flat = params.flat()
        dtypes = {p.dtype for p in flat}
        if len(dtypes) != 1:
            raise TypeError(
                f"shardopt.LBFGS needs parameters of one dtype, got {sorted(map(str, dtypes))}"
            )
        super().__init__(params, num_shards, **options)
        self._dtype = dtypes.pop()
        live = self.shard_map.live_shards()
        self._machine = VectorMachine([self.handles[s] for s in live])
        self._lbfgs_state: dict[str, Any] = {}
        self._params_stale = False
        # Where each shard's slice of a flat vector sits in torch's flat (param_groups) order.
        starts = np.cumsum([0] + [p.numel() for p in flat])
        self._numel = int(starts[-1])
        self._segments = {
            s: [(int(starts[pid]), flat[pid].numel()) for pid in self.shard_map.ids_of(s)]
            for s in live
        }

    @property
    def machine(self) -> VectorMachine:
        return self._machine

    def add_param_group(self, group_index: int) -> None:
        raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")

    # ----- parameters in and out ------------------------------------------------------------

    def _pull_params(self) -> None:
        """Copies the shards' parameters into the user's tensors (all of them: LBFGS moves all)."""
        params = self._params.flat()
        results = self._machine.flush(("params_out",))
        for s, shard_results in zip(self._machine.shards, results):
            self.shard_map.copy_back(s, shard_results[-1], params)
        self._params_stale = False

    def _evaluate(self, closure: Callable[[], Any]) -> tuple[Any, ShardedVector]:
        """Runs the closure on the current parameters and pushes its gradient as a new vector."""
        params = self._params.flat()
        for s in self._machine.shards:
            changed = self.data_path.changed_params(s, params)
            if changed is not None:
                self._machine.queue_each({s: ("set_params_update", changed)})
        if self._params_stale:
            self._pull_params()
        loss = closure()
        flat_grad = self._machine.new()
        ops = {}
        for s in self._machine.shards:
            layout = self.shard_map.layout(s)
            buffer = layout.empty()
            has_grad = []
            for j, pid in enumerate(self.shard_map.ids_of(s)):
                grad = params[pid].grad
                has_grad.append(grad is not None)
                if grad is not None:
                    layout.view(buffer, j).copy_(grad.to_dense() if grad.is_sparse else grad)
            ops[s] = ("grad_in", flat_grad.name, to_numpy(buffer), tuple(has_grad))
        self._machine.queue_each(ops)
        return loss, flat_grad

    def _add_grad(self, step_size: Any, direction: ShardedVector) -> None:
        self._machine.queue(("param_add", step_size, direction.name))
        self._params_stale = True

    def _directional_evaluate(
        self, closure: Callable[[], Any], x: ShardedVector, t: Any, d: ShardedVector
    ) -> tuple[float, ShardedVector]:
        self._add_grad(t, d)
        loss, flat_grad = self._evaluate(closure)
        self._machine.queue(("param_load", x.name))
        self._params_stale = True
        return float(loss), flat_grad

    # ----- the algorithm: torch.optim.LBFGS.step, over sharded vectors ----------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None, scaling: AmpScaling | None = None) -> Any:
        """Performs one LBFGS step (up to ``max_iter`` iterations), as torch.optim.LBFGS does.

        Args:
            closure: reevaluates the model and returns the loss; called on the client.
        """
        if closure is None:
            raise TypeError("LBFGS.step() missing required argument: 'closure'")
        closure = torch.enable_grad()(closure)
        group = self._params.groups[0]
        lr = group["lr"]
        max_iter = group["max_iter"]
        max_eval = group["max_eval"]
        tolerance_grad = group["tolerance_grad"]
        tolerance_change = group["tolerance_change"]
        line_search_fn = group["line_search_fn"]
        history_size = group["history_size"]

        state = self._lbfgs_state
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        self.shard_map.set_state_order([0])

        orig_loss, flat_grad = self._evaluate(closure)
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1

        opt_cond = flat_grad.abs().max() <= tolerance_grad
        if opt_cond:
            self._finish()
            return orig_loss

        d = state.get("d")
        t = state.get("t")
        old_dirs = state.get("old_dirs")
        old_stps = state.get("old_stps")
        ro = state.get("ro")
        H_diag = state.get("H_diag")
        prev_flat_grad = state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / y.dot(y)

                num_old = len(old_dirs)
                if "al" not in state:
                    state["al"] = [None] * history_size
                al = state["al"]

                q = flat_grad.neg()
                for i in range(num_old - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])

                d = r = q.mul(H_diag)
                for i in range(num_old):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr
            else:
                t = lr

            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self._machine.derive_params()

                def obj_func(x, t, d):
                    return self._directional_evaluate(closure, x, t, d)

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    obj_func, x_init, t, d, loss, flat_grad, gtd
                )
                self._add_grad(t, d)
                opt_cond = flat_grad.abs().max() <= tolerance_grad
            else:
                self._add_grad(t, d)
                if n_iter != max_iter:
                    loss_value, flat_grad = self._evaluate(closure)
                    loss = float(loss_value)
                    opt_cond = flat_grad.abs().max() <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        state["old_dirs"] = old_dirs
        state["old_stps"] = old_stps
        state["ro"] = ro
        state["H_diag"] = H_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        self._finish()
        return orig_loss

    def _finish(self) -> None:
        """Brings the user's tensors up to the shards' parameters and runs queued operations."""
        if self._params_stale:
            self._pull_params()
        else:
            self._machine.flush()

    # ----- the state between steps as plain values (a restarted gateway's resume) -----------

    def portable_state(self) -> dict[str, Any]:
        """The state between steps as plain values: numbers and 0-dim tensors by value (their
        dtype named), the flat vectors by name (their values stay on the shards), and the
        vector machine's naming. A backend over the same shards continues from it
        (:meth:`adopt_portable_state`) exactly where this one stopped.

        Raises:
            TypeError: a value that is none of those.
        """

        def portable(value: Any) -> Any:
            if isinstance(value, ShardedVector):
                return {"vector": value.name}
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                return {"tensor": str(value.dtype), "value": value.item()}
            if isinstance(value, list):
                return [portable(v) for v in value]
            if value is None or isinstance(value, (bool, int, float)):
                return value
            raise TypeError(f"LBFGS state holds a {type(value).__name__}: not portable")

        state = {key: portable(value) for key, value in self._lbfgs_state.items()}
        return {"state": state, "machine": self._machine.portable()}

    def adopt_portable_state(self, saved: dict[str, Any]) -> None:
        """Continues from :meth:`portable_state` of a backend over the same shards.

        Raises:
            ValueError: ``saved`` is not such a state.
        """

        def value_of(value: Any) -> Any:
            if isinstance(value, dict) and set(value) == {"vector"}:
                return ShardedVector(self._machine, str(value["vector"]))
            if isinstance(value, dict) and set(value) == {"tensor", "value"}:
                dtype = getattr(torch, str(value["tensor"]).removeprefix("torch."), None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"no dtype {value['tensor']!r}")
                return torch.tensor(value["value"], dtype=dtype)
            if isinstance(value, list):
                return [value_of(v) for v in value]
            if value is None or isinstance(value, (bool, int, float)):
                return value
            raise ValueError(f"not a portable LBFGS state value: {value!r:.80}")

        if not isinstance(saved, dict) or set(saved) != {"state", "machine"}:
            raise ValueError("not a portable LBFGS state")
        state = {str(key): value_of(value) for key, value in saved["state"].items()}
        self._machine.adopt(saved["machine"])
        self._lbfgs_state = state
        self.shard_map.set_state_order([0] if state else [])

    # ----- state in torch's LBFGS format ----------------------------------------------------

    def _materialize(self) -> dict[str, Any]:
        """The state with every sharded vector gathered into one flat tensor, in torch's order."""
        state = self._lbfgs_state
        vectors: list[ShardedVector] = []
        for key in _VECTOR_KEYS:
            value = state.get(key)
            if isinstance(value, ShardedVector):
                vectors.append(value)
            elif isinstance(value, list):
                vectors.extend(value)
        for v in vectors:
            self._machine.queue(("read", v.name))
        results = self._machine.flush() if vectors else []
        full: dict[str, torch.Tensor] = {}
        for k, v in enumerate(vectors):
            flat = torch.empty(self._numel, dtype=self._dtype)
            for s, shard_results in zip(self._machine.shards, results):
                local = readonly_tensor(shard_results[k])
                offset = 0
                for start, numel in self._segments[s]:
                    flat[start : start + numel].copy_(local[offset : offset + numel])
                    offset += numel
            full[v.name] = flat

        def copy(value: Any) -> Any:
            if isinstance(value, ShardedVector):
                return full[value.name]
            if isinstance(value, torch.Tensor):
                return value.clone()
            if isinstance(value, list):
                return [copy(x) for x in value]
            return value

        return {key: copy(value) for key, value in state.items()}

    def state_parts(self, param_ids: tuple[int, ...] | None = None) -> Iterator[dict[int, Any]]:
        wanted = param_ids is None or 0 in param_ids
        yield {0: self._materialize()} if wanted and self._lbfgs_state else {}

    def stream_state_file(
        self, path: str, order: list[int], param_groups: list[dict[str, Any]]
    ) -> bool:
        return False  # torch's form of LBFGS's state is assembled here, not on the shards

    def set_param_state(self, pid: int, value: dict[str, Any]) -> None:
        if pid != 0:
            raise KeyError("torch's LBFGS keeps its state under the first parameter only")
        history_size = self._params.groups[0]["history_size"]
        self._lbfgs_state = self._scatter(self._validated(value, history_size))
        self.shard_map.set_state_order([0])

    def clear_param_state(self, pid: int, options: tuple[dict, ...]) -> None:
        self.load_state({}, options)  # the first parameter holds all of LBFGS's state

    def _validated(self, state: dict[str, Any], history_size: Any) -> dict[str, Any]:
        """Checks a torch LBFGS state (its history as its group's ``history_size`` allows) and
        casts it as torch would (floating tensors to dtype)."""
        if not isinstance(state, dict):
            raise TypeError(f"LBFGS state must be a dict, got {type(state).__name__}")

        def cast(value: Any, key: str) -> Any:
            if isinstance(value, torch.Tensor):
                if key in _VECTOR_KEYS and value.numel() != self._numel:
                    raise ValueError(
                        f"loaded state dict has {key!r} with {value.numel()} elements, "
                        f"expected {self._numel} (the parameters' total)"
                    )
                value = value.detach().cpu()
                return value.to(self._dtype) if value.is_floating_point() else value.clone()
            if isinstance(value, (list, tuple)):
                return [cast(v, key) for v in value]
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            raise TypeError(f"unexpected {type(value).__name__} under {key!r} in LBFGS state")

        checked = {key: cast(value, key) for key, value in state.items()}
        if isinstance(checked.get("old_dirs"), list) != isinstance(checked.get("old_stps"), list):
            raise ValueError("loaded state dict has old_dirs and old_stps of different kinds")
        _check_history(checked, history_size)
        return checked

    def _scatter(self, state: dict[str, Any]) -> dict[str, Any]:
        """Sends the flat vectors of a validated state to the shards, as sharded vectors."""

        def place(value: torch.Tensor) -> ShardedVector:
            vector = self._machine.new()
            flat = value.reshape(-1)
            ops = {}
            for s in self._machine.shards:
                part = torch.cat([flat[start : start + n] for start, n in self._segments[s]])
                ops[s] = ("put", vector.name, part.numpy())
            self._machine.queue_each(ops)
            return vector

        result = {}
        for key, value in state.items():
            if key in _VECTOR_KEYS and isinstance(value, torch.Tensor):
                result[key] = place(value)
            elif key in _VECTOR_KEYS and isinstance(value, list):
                result[key] = [place(v) for v in value]
            else:
                result[key] = value
        self._machine.flush()
        return result

    def load_state(self, state: dict[int, dict[str, Any]], options: tuple[dict, ...]) -> None:
        """Validates a torch.optim.LBFGS state and sends its flat vectors to the shards."""
        unknown = [pid for pid in state if pid != 0]
        if unknown:
            raise ValueError(
                f"loaded state dict has LBFGS state under parameter id(s) {unknown}; "
                "torch's LBFGS keeps it under the first parameter only"
            )
        history_size = options[0].get("history_size") if options else None
        checked = self._validated(state[0], history_size) if 0 in state else {}
        self._lbfgs_state = self._scatter(checked)
        self.shard_map.set_state_order([0] if checked else [])

    # ----- checkpoints: written here, in torch's flat LBFGS layout ---------------------------

    def save_checkpoint(self, path: str, blocking: bool, key: bytes | None) -> SaveHandle:
        parts = list(self.state_parts())  # LBFGS's vectors gathered into torch's flat layout
        groups = self._params.packed_groups(id_type=str)
        return checkpoints.save(path, groups, blocking, key, parts=lambda: parts)

    def load_checkpoint(self, path: str, key: bytes | None) -> list[dict[str, Any]]:
        commit, saved_groups = checkpoints.read_groups(
            path, self._params.groups, self.shard_map.num_params, key
        )
        ids = list(range(self.shard_map.num_params))
        options = tuple(group_options(g) for g in saved_groups)  # its history_size bounds
        self.load_state(checkpoint.read_params_state(commit, ids), options)
        return saved_groups


class LBFGS(ShardedOptimizer):
    """``torch.optim.LBFGS`` over sharded flat vectors: same arguments, same trajectory.

    With one shard the trajectory is bit-identical to torch's; with more, the global dot products
    are sums of per-shard partials, so results agree to rounding (about 1e-9 in float64).

    Args:
        params: the parameters (one group, as torch's LBFGS requires).
        lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn:
            as ``torch.optim.LBFGS``.
        num_shards, actor_options, shared_memory, default_dtype: as
            :class:`~shardopt.ShardedOptimizer`.
        address, token, tls: a gateway's ``host:port`` and how to reach it: the gateway runs
            the step (its vectors on its shards) and asks this process to evaluate the
            closure where the algorithm needs it.
        reconnect_timeout: with ``address``: how long a call retries while no gateway
            answers. A step is tried again only if the gateway had not begun it (no evaluation
            was asked for); one interrupted later fails (it is never applied twice).

    Example:
        >>> import torch, shardopt
        >>> x = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
        >>> opt = shardopt.LBFGS([x], line_search_fn="strong_wolfe", num_shards=1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(5):
        ...     _ = opt.step(closure)
        >>> opt.close()
    """

    _local_backend = LBFGSShards  # the one seam LBFGS plugs into

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        num_shards: int | None = None,
        actor_options: dict[str, Any] | None = None,
        shared_memory: bool | None = None,
        address: str | None = None,
        token: str | None = None,
        tls: bool | str | os.PathLike | None = None,
        reconnect_timeout: datetime.timedelta | float = datetime.timedelta(minutes=2),
        default_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            params,
            torch.optim.LBFGS,
            num_shards=num_shards,
            actor_options=actor_options,
            shared_memory=shared_memory,
            address=address,
            token=token,
            tls=tls,
            reconnect_timeout=reconnect_timeout,
            default_dtype=default_dtype,
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
        )
