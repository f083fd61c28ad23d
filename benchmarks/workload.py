"""The step benchmark's workload: transformer-shaped parameters, the algorithms, timing, memory.

Shared by ``step_bench.py`` (the configurations that step in the benchmark's own process) and
``anchors.py`` (those that run in processes of their own). It imports neither Ray nor shardopt,
so the child processes start quickly.

Talks to: torch only; reads ``/proc`` for peak memory (Linux; elsewhere the probes return None).
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Algorithm:
    """An algorithm as every configuration runs it, and the bytes one step must move per param."""

    label: str
    optimizer_class: type[torch.optim.Optimizer]
    hyperparameters: dict[str, Any]
    bytes_per_param: int
    bytes_note: str


ALGORITHMS: dict[str, Algorithm] = {
    "adamw": Algorithm(
        "AdamW",
        torch.optim.AdamW,
        {"lr": 1e-3, "weight_decay": 1e-2},
        28,
        "read p, g, m, v; write p, m, v",
    ),
    "sgd": Algorithm(
        "SGD(momentum=0.9)",
        torch.optim.SGD,
        {"lr": 1e-2, "momentum": 0.9},
        20,
        "read p, g, buf; write p, buf",
    ),
}


def transformer_shapes(num_params: int, layers: int = 2) -> list[tuple[str, Shape]]:
    """Parameter shapes of a small decoder with about ``num_params`` floats (never more).

    An embedding takes about 40% of the floats; each layer has four big matrices (qkv, proj,
    fc1, fc2: ``12 * width**2`` floats) and eight vectors (their biases, two LayerNorms); a
    final LayerNorm closes the list. The width is the largest multiple of 16 that keeps the
    layers to about 60% of the floats; the embedding's rows take up the rest.

    Raises:
        ValueError: ``num_params`` is too small for one embedding row.

    Example:
        >>> sum(math.prod(s) for _, s in transformer_shapes(100_000))
        99984
    """
    width = max(16, 16 * int(math.sqrt(0.6 * num_params / (12 * layers)) // 16))
    w = width
    per_layer = [
        ("attn.qkv.weight", (3 * w, w)),
        ("attn.qkv.bias", (3 * w,)),
        ("attn.proj.weight", (w, w)),
        ("attn.proj.bias", (w,)),
        ("ln1.weight", (w,)),
        ("ln1.bias", (w,)),
        ("mlp.fc1.weight", (4 * w, w)),
        ("mlp.fc1.bias", (4 * w,)),
        ("mlp.fc2.weight", (w, 4 * w)),
        ("mlp.fc2.bias", (w,)),
        ("ln2.weight", (w,)),
        ("ln2.bias", (w,)),
    ]
    body = [(f"layers.{i}.{name}", shape) for i in range(layers) for name, shape in per_layer]
    body += [("norm.weight", (w,)), ("norm.bias", (w,))]
    rows = (num_params - count_params(body)) // w
    if rows < 1:
        raise ValueError(f"num_params={num_params} is too small for {layers} layers of width {w}")
    return [("embed.weight", (rows, w)), *body]


def count_params(shapes: list[tuple[str, Shape]]) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def make_params(shapes: list[tuple[str, Shape]], seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters of these shapes with fixed random values and their gradients already set."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape).normal_(0.0, 0.02, generator=gen))
        p.grad = torch.empty(shape).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Independent copies of parameters and their gradients."""
    clones = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        clones.append(q)
    return clones


def greedy_owners(sizes: list[int], parts: int) -> list[int]:
    """Largest first onto the least-loaded part (as ZeroRedundancyOptimizer and shardopt do)."""
    load = [0] * parts
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owners[i] = min(range(parts), key=lambda k: (load[k], k))
        load[owners[i]] += sizes[i]
    return owners


# ----- timing ---------------------------------------------------------------------------------


@dataclass
class Samples:
    """One configuration's step times in milliseconds, or the error that stopped it."""

    warmup_ms: list[float] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, ms: float, warmup: bool) -> None:
        (self.warmup_ms if warmup else self.samples_ms).append(ms)

    @property
    def median_ms(self) -> float | None:
        if self.error is not None or not self.samples_ms:
            return None
        return statistics.median(self.samples_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "samples_ms": self.samples_ms,
            "warmup_ms": self.warmup_ms,
            "error": self.error,
        }


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


def round_robin(
    steps: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, Samples]:
    """Times each step function once per round, in an order that rotates every round.

    The first ``warmup`` rounds are kept apart as warm-up. A step that raises is recorded with
    its error and leaves the rotation; the others go on. ``before_each`` (a barrier, say) runs
    untimed before every step.
    """
    names = list(steps)
    out = {name: Samples() for name in names}
    for r in range(warmup + repeats):
        gc.collect()
        shift = r % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            samples = out[name]
            if samples.error is not None:
                continue
            if before_each is not None:
                before_each()
            try:
                start = time.perf_counter()
                steps[name]()
                elapsed = time.perf_counter() - start
            except Exception as exc:  # an anchor that fails is reported, not fatal
                samples.error = describe(exc)
                continue
            samples.add(elapsed * 1e3, warmup=r < warmup)
    return out


# ----- memory ---------------------------------------------------------------------------------


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """A process's peak resident set size (VmHWM) since it started or since the last reset.

    Includes pages of shared memory the process touched (Ray's object store, /dev/shm buffers).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Restarts a process's peak RSS from its current RSS (Linux ``clear_refs``); False if not."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    """This process's peak RSS over its whole life (``getrusage``; not affected by resets)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def processes_with(
    cmdline_part: str, env_entry: str | None = None, ancestor: int | None = None
) -> list[int]:
    """Pids of processes whose command line (and environment) contain these.

    With ``ancestor``, only its descendants: a local Ray started by this process runs its
    workers under it, while another Ray on the same machine does not.
    """
    parents: dict[int, int] = {}
    pids = []
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return pids
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parents[pid] = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if cmdline_part.encode() not in f.read():
                    continue
            if env_entry is not None:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if env_entry.encode() not in f.read().split(b"\0"):
                        continue
        except (OSError, ValueError, IndexError):
            continue
        pids.append(pid)
    if ancestor is not None:
        pids = [p for p in pids if _descends(p, ancestor, parents)]
    return sorted(pids)


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == ancestor:
            return True
    return False


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all


def wait_for_quiet(
    max_busy: float = 0.2, window_s: float = 0.5, timeout_s: float = 15.0
) -> dict[str, float]:
    """Waits (at most ``timeout_s``) for a ``window_s`` in which the CPUs were mostly idle.

    Ray prestarts workers and agents for a while after it starts; timing then measures them.

    Returns:
        The seconds waited and the busy fraction of the CPUs in the last window (both 0.0 where
        ``/proc/stat`` is missing).
    """
    start = time.monotonic()
    busy = 0.0
    before = _cpu_times()
    while before is not None and time.monotonic() - start < timeout_s:
        time.sleep(window_s)
        after = _cpu_times()
        if after is None or after[1] == before[1]:
            break
        busy = 1.0 - (after[0] - before[0]) / (after[1] - before[1])
        if busy <= max_busy:
            break
        before = after
    return {"waited_s": time.monotonic() - start, "cpu_busy": busy}
