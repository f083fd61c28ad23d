"""Failure injection for tests and benchmarks; nothing in the library calls it.

Shard hosts are killed (:func:`kill`) or made to die at a chosen moment of a step
(:func:`inject_fault`) from outside: the fault is installed on the live actor through Ray's
``__ray_call__``, so the production step has no fault hooks.

Talks to: shard host actors through Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

FAULTS = ("before_step", "after_step")


def _exit_at_step(host: Any, key: str, when: str) -> None:
    """Runs inside a shard host: its process exits as shard ``key``'s next step arrives
    (``"before_step"``) or once it has applied it, before answering (``"after_step"``)."""
    shard = host._shards[key]
    step = shard.step

    def dying_step(request: Any) -> Any:
        if when == "before_step":
            os._exit(1)
        step(request)
        os._exit(1)

    shard.step = dying_step


def inject_fault(handle: Any, when: str) -> None:
    """Makes the host of the shard behind ``handle`` (a ShardHandle) die at its next step.

    Raises:
        ValueError: ``when`` is not one of :data:`FAULTS`.
    """
    if when not in FAULTS:
        raise ValueError(f"unknown fault {when!r} (one of {FAULTS})")
    ray.get(handle.host.__ray_call__.remote(_exit_at_step, handle.key, when))


def kill(host: Any, timeout_s: float = 60.0) -> None:
    """``ray.kill``, then waits until the actor is really gone (ray.kill lands asynchronously).

    Raises:
        AssertionError: the actor still answers after ``timeout_s``.
    """
    ray.kill(host)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(host.info.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.1)
    raise AssertionError("the actor survived ray.kill")
