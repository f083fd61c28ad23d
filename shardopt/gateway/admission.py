"""What a gateway client may ask for, checked before anything is built.

A gateway client is a tenant, not an operator: it chooses an optimizer among
:data:`OPTIMIZERS` and that class's own constructor arguments, with plain values; it never
chooses code, processes, paths, addresses or resources. This module turns a ``SessionSpec``
into the keyword arguments of a :class:`~shardopt.client.optimizer.ShardedOptimizer`:

- hyperparameters are exactly the optimizer class's constructor arguments (from its
  signature, less ``params``); any other key (``actor_options``, ``address``, ``group``,
  ``tls``, ``replicate``, ...) is refused by name, as is any value that is not plain data;
- group membership comes only from ``SessionSpec.group``, under a name scoped by the token;
  placement and shard resources are the operator's (:class:`ShardSettings`), never a client's;
- shard counts, group sizes and group timeouts are bounded by
  :class:`~shardopt.gateway.quotas.Limits`;
- param group options are plain values, and option updates pass torch's own checks;
- checkpoint paths live under the token's own directory (or prefix, on an object store),
  symbolic links that lead out refused; on an object store, names of plain characters only.

Errors are ``ValueError``/``TypeError`` (INVALID_ARGUMENT) or
:class:`~shardopt.core.errors.QuotaExceededError` (RESOURCE_EXHAUSTED), raised before any
allocation.

Talks to nothing but torch (a throwaway optimizer runs torch's checks of updated options) and
the file system under ``--checkpoint-dir`` (what a checkpoint path leads to).
"""

from __future__ import annotations

import inspect
import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from shardopt.actor.placement import normalize_resources, normalize_strategy
from shardopt.checkpoint.storage import location
from shardopt.core.default_dtype import DEFAULT_DTYPES
from shardopt.core.errors import QuotaExceededError
from shardopt.gateway.auth import principal_of
from shardopt.gateway.quotas import Limits

OPTIMIZERS = {
    cls.__name__: cls
    for cls in vars(torch.optim).values()
    if isinstance(cls, type)
    and issubclass(cls, torch.optim.Optimizer)
    and cls is not torch.optim.Optimizer
}
"""What a client may ask for, by name: torch.optim's classes (no imports by name). LBFGS runs
as :class:`shardopt.LBFGS` and steps through ``ClosureStep``."""

MAX_OPTIONS = 64
"""Options of one param group (torch's have at most 12; schedulers add a few)."""
MAX_STRING = 256
MAX_SEQUENCE = 64
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NOT_OPTIONS = ("params", "param_names")
DEFAULT_GROUP_TIMEOUT_S = 300.0
"""A sync group step's wait when the client names none (ShardedOptimizer's default)."""
SCOPE_CHARS = 16
"""How much of a token's principal (a hash) names its groups and its checkpoint directory."""


def scope_of(principal: str) -> str:
    """The prefix that keeps a token's groups and checkpoints apart from every other token's."""
    return principal[:SCOPE_CHARS]


def token_scope(token: str | None) -> str:
    """A token's scope: the name of its directory under ``--checkpoint-dir`` (16 hex digits of
    its SHA-256; ``anonymous`` without authentication) and the prefix of its group names."""
    return scope_of(principal_of(token))


def constructor_options(optimizer_class: type) -> frozenset[str]:
    """The keyword arguments ``optimizer_class`` takes besides ``params``, from its signature."""
    signature = inspect.signature(optimizer_class.__init__)
    return frozenset(
        name
        for name, p in signature.parameters.items()
        if name not in ("self", "params")
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def _plain(value: Any, where: str) -> Any:
    """``value`` if it is plain data: None, a bool, an int, a float, a short string, or a short
    list/tuple of numbers (and None: Adafactor's ``eps`` is ``(None, 1e-3)``).

    Raises:
        TypeError: anything else (dicts, tensors, nested sequences).
        ValueError: a string or sequence too long.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"{where}: a string of {len(value)} characters (at most {MAX_STRING})")
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_SEQUENCE:
            raise ValueError(f"{where}: {len(value)} items (at most {MAX_SEQUENCE})")
        for item in value:
            if item is not None and not isinstance(item, (bool, int, float)):
                raise TypeError(f"{where}: a sequence may hold numbers only, not {item!r}")
        return value
    raise TypeError(f"{where}: {type(value).__name__} values are not accepted (plain data only)")


def check_hyperparameters(optimizer_class: type, options: dict[str, Any]) -> dict[str, Any]:
    """A session's hyperparameters: the class's constructor arguments, with plain values.

    Raises:
        ValueError: a key that is not one of ``optimizer_class``'s constructor arguments.
        TypeError: a value that is not plain data.
    """
    allowed = constructor_options(optimizer_class)
    unknown = sorted(set(options) - allowed)
    if unknown:
        named = ", ".join(repr(k) for k in unknown)
        raise ValueError(
            f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} {named} for "
            f"{optimizer_class.__name__}; accepted: {', '.join(sorted(allowed))}"
        )
    for key, value in options.items():
        _plain(value, f"hyperparameter {key!r}")
    return dict(options)


def check_group_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """A param group's options: plain values, not ``params``/``param_names``, not too many.

    Raises:
        ValueError: a reserved key or too many options.
        TypeError: a value that is not plain data.
    """
    if len(options) > MAX_OPTIONS:
        raise ValueError(f"{where}: {len(options)} options (at most {MAX_OPTIONS})")
    for key, value in options.items():
        if key in NOT_OPTIONS:
            raise ValueError(f"{where}: options cannot set {key!r}")
        if len(key) > MAX_STRING:
            raise ValueError(f"{where}: an option name of {len(key)} characters")
        _plain(value, f"{where}: option {key!r}")
    return dict(options)


def check_group_update(
    optimizer_class: type,
    merged: dict[str, Any],
    where: str,
    limits: Limits | None = None,
    before: dict[str, Any] | None = None,
) -> None:
    """Runs torch's own checks on a param group's options after an update, and this gateway's
    bounds on LBFGS's history (at every update: opening, updates, loads).

    torch checks hyperparameters in the constructor only; a throwaway ``optimizer_class``
    over one 1x1 tensor, built with the group's constructor arguments, checks them the same way.

    Args:
        limits: the gateway's limits (default ones if None).
        before: the group's options before this update, if it has any: LBFGS's
            ``history_size`` may not shrink (torch never trims a history longer than it, so it
            would grow without a bound).

    Raises:
        ValueError, TypeError: what torch raises for these options, or a shrinking history.
        QuotaExceededError: an LBFGS history longer than the gateway allows.
    """
    check_group_options(merged, where)
    if issubclass(optimizer_class, torch.optim.LBFGS):
        _check_lbfgs(merged, limits or Limits(), where)
        was = (before or {}).get("history_size")
        if isinstance(was, int) and merged.get("history_size", was) < was:
            raise ValueError(
                f"{where}: LBFGS history_size cannot shrink during a session ({was} to "
                f"{merged['history_size']}): torch never trims the history it holds"
            )
    allowed = constructor_options(optimizer_class)
    kwargs = {k: v for k, v in merged.items() if k in allowed}
    try:
        optimizer_class([torch.zeros(1, 1)], **kwargs)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from None
    except RuntimeError as err:  # torch refuses some combinations (fused + differentiable)
        raise ValueError(f"{where}: {err}") from None


def check_param_dtype(dtype: torch.dtype, name: str) -> None:
    """Parameters must be floating point or complex (torch's optimizers update nothing else).

    Raises:
        TypeError: an integer or bool parameter.
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"parameter {name!r} is {str(dtype).removeprefix('torch.')}: only floating point "
            f"and complex parameters can be optimized"
        )


@dataclass(frozen=True)
class ShardSettings:
    """The operator's placement of shard groups' shards (``shardopt serve`` flags)."""

    placement: str | None = None
    """Ray placement strategy (--placement); None: no placement group."""
    shard_resources: dict[str, float] = field(default_factory=dict)
    """What each shard reserves under ``placement`` (--shard-resources; default one CPU)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement", normalize_strategy(self.placement))
        if self.shard_resources:
            if self.placement is None:
                raise ValueError("shard resources need a placement strategy (--placement)")
            normalize_resources(self.shard_resources)


def optimizer_kwargs(
    spec: Any,
    optimizer_class: type,
    principal: str,
    limits: Limits,
    shards: ShardSettings,
    max_shards: int,
    default_shards: int,
) -> dict[str, Any]:
    """The keyword arguments of a session's ShardedOptimizer, from a ``SessionSpec``.

    Args:
        max_shards: the most shards a session may have.
        default_shards: the shards of a session that asks for none.

    Raises:
        ValueError, TypeError: a hyperparameter or group option a client may not set.
        QuotaExceededError: more than ``max_shards`` shards.
    """
    from shardopt.core import wire

    kwargs = check_hyperparameters(optimizer_class, wire.decode_options(spec.hyperparameters))
    if optimizer_class is torch.optim.LBFGS:
        _check_lbfgs(kwargs, limits)
    num_shards = spec.num_shards or default_shards
    if num_shards > max_shards:
        raise QuotaExceededError(
            f"{num_shards} shards asked for; this gateway gives a session at most "
            f"{max_shards} (shardopt serve --max-shards)"
        )
    kwargs["num_shards"] = num_shards
    kwargs["default_dtype"] = _default_dtype(spec.default_dtype)
    if spec.HasField("group") and spec.group.name:
        kwargs.update(_group_kwargs(spec.group, principal, limits, shards))
    return kwargs


def _default_dtype(code: int) -> torch.dtype:
    """The session's default dtype (``SessionSpec.default_dtype``; unset: float32).

    Raises:
        ValueError: a dtype torch cannot make the default.
    """
    from shardopt.core import wire

    if not code:
        return torch.float32
    dtype = wire.DTYPES.get(code)
    if dtype not in DEFAULT_DTYPES:
        raise ValueError(
            f"Invalid default_dtype: {code} (FLOAT32, FLOAT64, FLOAT16 or BFLOAT16: the "
            "client's torch.get_default_dtype())"
        )
    return dtype


def _check_lbfgs(options: dict[str, Any], limits: Limits, where: str = "LBFGS") -> None:
    """LBFGS's history is its memory on the shards: up to ``2 * history_size + 4`` vectors of
    the parameters' size. Bounded by ``Limits.max_lbfgs_history``; an int from 1 (torch
    trims the history only when its length equals ``history_size``: a float or a number below
    1 never does, and the history would grow by two vectors every iteration); torch's line
    search only.

    Raises:
        QuotaExceededError: a longer history.
        ValueError: a history_size that is not a positive int, or another line search.
    """
    history = options.get("history_size", 100)
    if not isinstance(history, int) or isinstance(history, bool) or history < 1:
        raise ValueError(f"{where}: Invalid history_size: {history!r} (an int >= 1)")
    if history > limits.max_lbfgs_history:
        raise QuotaExceededError(
            f"LBFGS history_size={history}: this gateway allows at most "
            f"{limits.max_lbfgs_history} (each entry holds two vectors of the parameters' size)"
        )
    if options.get("line_search_fn") not in (None, "strong_wolfe"):
        raise ValueError(
            f"Invalid line_search_fn: {options['line_search_fn']!r} (None or 'strong_wolfe')"
        )


def _group_kwargs(g: Any, principal: str, limits: Limits, shards: ShardSettings) -> dict[str, Any]:
    if not GROUP_NAME.fullmatch(g.name):
        raise ValueError(f"Invalid group name: {g.name!r} (1-100 letters, digits, '.', '_' or '-')")
    if g.placement or g.shard_resources:
        raise ValueError(
            "placement and shard_resources are set by the gateway's operator (shardopt serve "
            "--placement/--shard-resources), not by clients"
        )
    if not 1 <= g.world_size <= limits.max_world_size:
        raise ValueError(f"Invalid world_size: {g.world_size} (1 to {limits.max_world_size})")
    timeout = g.timeout_seconds or min(DEFAULT_GROUP_TIMEOUT_S, limits.max_group_timeout_s)
    if not (math.isfinite(timeout) and 0 < timeout <= limits.max_group_timeout_s):
        raise ValueError(
            f"Invalid timeout: {g.timeout_seconds} s (this gateway allows up to "
            f"{limits.max_group_timeout_s:g} s)"
        )
    kwargs: dict[str, Any] = dict(
        group=f"{scope_of(principal)}-{g.name}",  # a token never reaches another's group
        world_size=g.world_size,
        rank=g.rank,
        mode=g.mode or "sync",
        max_staleness=g.max_staleness if g.HasField("max_staleness") else None,
        timeout=timeout,
    )
    if shards.placement is not None:
        kwargs["placement"] = shards.placement
        kwargs["shard_resources"] = dict(shards.shard_resources) or None
    return kwargs


def param_groups_of(
    spec: Any, params: list[torch.Tensor], options: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A session's param groups from its spec and their checked ``options``.

    Raises:
        ValueError: a parameter in no group, in two, or an index past the parameters.
    """
    if not spec.param_groups:
        return [{"params": params}]
    seen: list[int] = []
    groups = []
    for g, options_ in zip(spec.param_groups, options):
        if any(i >= len(params) for i in g.params):
            raise ValueError(f"a param group names a parameter beyond {len(params)}")
        seen.extend(g.params)
        groups.append({**options_, "params": [params[i] for i in g.params]})
    if sorted(seen) != list(range(len(params))):
        raise ValueError("every parameter must be in exactly one param group")
    return groups


# ----- checkpoint paths ---------------------------------------------------------------------

MAX_CHECKPOINT_ENTRIES = 10_000
OBJECT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,254}")
"""A part of a checkpoint path under an object store URL: nothing a URL or fsspec reads
specially (``?``, ``#``, ``::``, ``*``, ``%``, spaces, ...)."""


def checkpoint_root(checkpoint_dir: str) -> pathlib.Path | str:
    """``--checkpoint-dir`` as the gateway uses it: a resolved directory, or an object store
    URL (``s3://bucket/prefix``, credentials from the gateway's and the nodes' environment).

    Raises:
        ValueError, ImportError: a URL of an unknown protocol, or whose file system package is
            not installed (see :func:`shardopt.checkpoint.storage.location`).
    """
    where = location(checkpoint_dir)
    return where if "://" in where else pathlib.Path(where).resolve()


def checkpoint_path(root: pathlib.Path | str, principal: str, relative: str) -> pathlib.Path | str:
    """Where a token's checkpoint ``relative`` lives: under ``root/<its scope>/``.

    ``root`` is what :func:`checkpoint_root` returns. The path must be relative and without
    ``..``. In a directory, it and every entry already in it must not lead out of the token's
    directory through a symbolic link; under an object store URL (no links there), each of its
    parts is letters, digits and ``_.=-``.

    Raises:
        ValueError: an absolute path, ``..``, a symbolic link that leads out, or (on an object
            store) a name with other characters.
    """
    path = pathlib.PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts or "\\" in relative:
        raise ValueError(f"checkpoint path {relative!r} must be relative, without '..'")
    if len(relative) > 1024:
        raise ValueError("a checkpoint path of more than 1024 characters")
    if isinstance(root, str):
        if not path.parts or not all(OBJECT_NAME.fullmatch(part) for part in path.parts):
            raise ValueError(
                f"checkpoint path {relative!r}: on this gateway's object store, a path is names "
                "of letters, digits and _.=- separated by /"
            )
        return "/".join((root, scope_of(principal), *path.parts))
    home = root / scope_of(principal)
    target = home / path
    escape = ValueError(
        f"checkpoint path {relative!r} leads out of this token's checkpoint directory "
        f"(a symbolic link)"
    )
    if not home.resolve().is_relative_to(root) or not target.resolve().is_relative_to(
        home.resolve()
    ):
        raise escape
    if target.is_dir():
        for count, entry in enumerate(target.rglob("*")):
            if count >= MAX_CHECKPOINT_ENTRIES:
                raise ValueError(f"checkpoint {relative!r} holds too many files")
            if entry.is_symlink() and not entry.resolve().is_relative_to(home.resolve()):
                raise escape
    return target
