"""The default dtype a shard runs torch's optimizer code under: its client's.

torch.optim makes a parameter's scalar state in the *default* dtype's precision: ``step`` (and
ASGD's ``eta``/``mu``, NAdam's ``mu_product``, which enter the update) is float64 when the
training process called ``torch.set_default_dtype(torch.float64)``, else float32
(``torch.optim.optimizer._get_scalar_dtype``). A shard runs in another process, whose default is
torch's own; it runs its optimizer's constructor, steps and loads under the default its client had
when the optimizer was made (:attr:`ShardSpec.default_dtype <shardopt.core.records.ShardSpec>`).

The default dtype is one setting per process, and a host's shards run in threads of their own:
:func:`running_under` lets any number of threads run under one default at a time, and a thread
that needs another waits until they are done (then the next dtype's threads go, first come first
served). Under the process's own default, with no one waiting, it costs a lock round trip.

Talks to nothing: torch's global default dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""What ``torch.set_default_dtype`` accepts."""


def check_default_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or this process's default dtype for None.

    Raises:
        TypeError: a dtype torch cannot make the default (torch's message).
    """
    if dtype is None:
        return torch.get_default_dtype()
    if dtype not in DEFAULT_DTYPES:
        raise TypeError(
            f"only floating-point types are supported as the default type, got {dtype!r}"
        )
    return dtype


class _DefaultDtypeSwitch:
    """Who runs under which default dtype in this process (see the module docstring)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._dtype: torch.dtype | None = None  # the dtype the running threads run under
        self._running = 0
        self._previous = torch.float32
        self._waiting = 0  # threads waiting for another dtype
        self._mine = threading.local()  # the dtype this thread runs under (nested blocks)

    @contextmanager
    def running_under(self, dtype: torch.dtype) -> Iterator[None]:
        mine = getattr(self._mine, "dtype", None)
        if mine is not None:  # nested in this thread's own block
            if mine != dtype:
                raise RuntimeError(f"already running under {mine}, cannot switch to {dtype}")
            yield
            return
        with self._changed:
            if self._running and (self._dtype != dtype or self._waiting):
                self._waiting += 1
                try:
                    self._changed.wait_for(lambda: not self._running)
                finally:
                    self._waiting -= 1
            if not self._running:
                self._previous = torch.get_default_dtype()
                if self._previous != dtype:
                    torch.set_default_dtype(dtype)
                self._dtype = dtype
            self._running += 1
        self._mine.dtype = dtype
        try:
            yield
        finally:
            self._mine.dtype = None
            with self._changed:
                self._running -= 1
                if not self._running:
                    if torch.get_default_dtype() != self._previous:
                        torch.set_default_dtype(self._previous)
                    self._dtype = None
                    self._changed.notify_all()


running_under = _DefaultDtypeSwitch().running_under
"""``with running_under(dtype):`` runs the block with ``dtype`` as torch's default dtype (see the
module docstring)."""
