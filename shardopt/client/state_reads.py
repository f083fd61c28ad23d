"""Whether a state dict being loaded is the one the proxy's ``state_dict()`` last returned,
untouched, with no change to the state made through the proxy since: a round trip.

``opt.load_state_dict(opt.state_dict())`` is a no-op in torch, and HF Trainer and Accelerate
run it on every new optimizer. Through shardopt it would gather the state and scatter it back;
in an async shard group it would also put back the state as it was when read, undoing what the
other workers' pushes did to it in between. So the proxy notes what it returned (each tensor
weakly, with its version counter; other values as they are) and a load of exactly that, with no
step, load or state write through the proxy in between, only takes its param groups' options.

Talks to nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class StateReads:
    """The proxy's last ``state_dict()["state"]``, as read (see the module docstring)."""

    def __init__(self) -> None:
        self._read: dict[Any, dict[str, tuple[Any, int | None]]] | None = None

    def changed(self) -> None:
        """The state may differ from the last read (a step, a load, a state write)."""
        self._read = None

    def note(self, state: Any) -> None:
        """Notes the ``state`` a ``state_dict()`` returns."""
        try:
            self._read = {k: {n: mark(v) for n, v in per.items()} for k, per in state.items()}
        except (AttributeError, TypeError):  # (a hook returned something else) no round trips
            self._read = None

    def unchanged(self, state: Any) -> bool:
        """Whether ``state`` (a state dict's ``"state"``) is the last read, untouched, and the
        state has not changed through the proxy since."""
        read = self._read
        if read is None or not isinstance(state, dict) or state.keys() != read.keys():
            return False
        for key, per in state.items():
            marks = read[key]
            if not isinstance(per, dict) or per.keys() != marks.keys():
                return False
            for name, value in per.items():
                if not same(value, marks[name]):
                    return False
        return True


def mark(value: Any) -> tuple[Any, int | None]:
    """What :func:`same` compares ``value`` with later: a tensor weakly, with its version
    counter; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return weakref.ref(value), value._version
    return value, None


def same(value: Any, marked: tuple[Any, int | None]) -> bool:
    """Whether ``value`` is still what :func:`mark` noted: the same tensor, unchanged in place,
    or an equal value. A container is taken as changed (it may hold changed tensors)."""
    held, version = marked
    if isinstance(value, torch.Tensor):
        return version is not None and held() is value and value._version == version
    if version is not None or isinstance(value, (dict, list, tuple)):
        return False  # a tensor replaced, or a container that may hold changed tensors
    try:
        return type(value) is type(held) and bool(value == held)
    except Exception:
        return False
