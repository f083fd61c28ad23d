"""Benchmark plumbing, once: how a run is timed, probed, described, logged and written down.

Every benchmark in this folder measures and reports through this module; what it measures (its
configurations, its table) stays in the benchmark, and the step benchmark's workload in
:mod:`workload`. This module owns

* timing: :class:`Samples` (one configuration's step times, or its error), :func:`rotate` and
  :func:`round_robin` (configurations take turns, the order rotating every round),
  :func:`timed`, :func:`back_to_back`;
* the machine: :class:`MachineCpu` (the CPU time a block cost, every process counted),
  :func:`wait_for_quiet` (idle CPUs before timing begins), peak-RSS probes,
  :func:`processes_with` (processes found in ``/proc``), :func:`free_port` on loopback;
* the run: :func:`run_meta` (command, date, versions, CPUs), :func:`logger` (progress lines on
  stderr), the command line (:func:`arg_parser`, :func:`parse_size`, :func:`comma_list`),
  :func:`fixed` (a number cell of a table), :func:`write_results` and :func:`publish` (the JSON
  under ``benchmarks/results`` and the printed table).

It imports neither torch, Ray nor shardopt at import time (:func:`run_meta` imports them when
called), so the processes the step benchmark spawns for its anchors start quickly.

Talks to: ``/proc`` (Linux; elsewhere the probes return None), the file system under
``benchmarks/results``, stdout and stderr.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
"""Where the benchmarks write their JSON (and plots) unless told otherwise (``--out``)."""
LOOPBACK = "127.0.0.1"

Measure = Callable[[], float]
"""One timed action: does it once, returns the seconds its timed part took."""


# ----- timing ---------------------------------------------------------------------------------


@dataclass
class Samples:
    """One configuration's step times in milliseconds, or the error that stopped it."""

    warmup_ms: list[float] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, ms: float, warmup: bool) -> None:
        """Keeps one time, apart from the others if it was a warm-up step."""
        (self.warmup_ms if warmup else self.samples_ms).append(ms)

    @property
    def median_ms(self) -> float | None:
        """The median of the timed samples; None after an error or without samples."""
        if self.error is not None or not self.samples_ms:
            return None
        return statistics.median(self.samples_ms)

    def to_json(self) -> dict[str, Any]:
        """The record the benchmarks write: median, samples, warm-up samples, error."""
        return {
            "median_ms": self.median_ms,
            "samples_ms": self.samples_ms,
            "warmup_ms": self.warmup_ms,
            "error": self.error,
        }


def describe(exc: BaseException) -> str:
    """An error as a record keeps it: its type and message, at most 4000 characters."""
    return f"{type(exc).__name__}: {exc}"[:4000]


def timed(action: Callable[[], object]) -> Measure:
    """A measurement that times one call of ``action`` whole."""

    def measure() -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    return measure


def rotate(
    measures: dict[str, Measure],
    warmup: int,
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, Samples]:
    """Runs each measurement once per round, in an order that rotates every round.

    The first ``warmup`` rounds are kept apart as warm-up. A measurement that raises is recorded
    with its error and leaves the rotation; the others go on.

    Args:
        measures: Per configuration, a measurement that returns the seconds it timed.
        warmup: Rounds kept apart as warm-up.
        repeats: Rounds timed after the warm-up.
        before_each: Runs untimed before every measurement (a barrier, say).

    Returns:
        Per configuration, its samples in milliseconds (or its error).
    """
    names = list(measures)
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
                seconds = measures[name]()
            except Exception as exc:  # a configuration that fails is reported, not fatal
                samples.error = describe(exc)
                continue
            samples.add(seconds * 1e3, warmup=r < warmup)
    return out


def round_robin(
    steps: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, Samples]:
    """:func:`rotate` over step functions, each call timed whole (see :func:`timed`)."""
    return rotate({name: timed(step) for name, step in steps.items()}, warmup, repeats, before_each)


def back_to_back(
    action: Callable[[], object], repeats: int, before: Callable[[], object] | None = None
) -> list[float]:
    """The seconds of ``repeats`` calls of ``action`` in a row; ``before`` runs untimed first."""
    measure = timed(action)
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        seconds.append(measure())
    return seconds


# ----- the machine: memory, processes, CPUs, ports --------------------------------------------


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


class MachineCpu:
    """The machine's CPU use over a block: every process on it, this one's children and Ray's
    included (``/proc/stat``).

    Example:
        >>> with MachineCpu() as cpu:
        ...     work()
        >>> cpu.busy_s, cpu.busy_fraction  # CPU-seconds not idle, and their share of the CPUs
    """

    def __init__(self) -> None:
        self.busy_s: float | None = None
        self.busy_fraction: float | None = None
        self._before: tuple[int, int] | None = None

    def __enter__(self) -> MachineCpu:
        self._before = _cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        after = _cpu_times()
        if self._before is None or after is None or after[1] == self._before[1]:
            return
        idle, total = after[0] - self._before[0], after[1] - self._before[1]
        self.busy_s = (total - idle) / os.sysconf("SC_CLK_TCK")
        self.busy_fraction = 1.0 - idle / total


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
    while _cpu_times() is not None and time.monotonic() - start < timeout_s:
        with MachineCpu() as window:
            time.sleep(window_s)
        if window.busy_fraction is None:
            break
        busy = window.busy_fraction
        if busy <= max_busy:
            break
    return {"waited_s": time.monotonic() - start, "cpu_busy": busy}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo or RPC rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ----- the run: metadata, progress, command line, results -------------------------------------


def run_meta() -> dict[str, Any]:
    """What a benchmark's JSON records about the run it comes from, before its own fields.

    Returns:
        ``command`` (the script's name and its arguments), ``date`` (local, to the second), the
        versions of ``torch``, ``ray``, ``shardopt`` and ``python``, and ``cpus``
        (``os.cpu_count()``).
    """
    # Imported here, not at the top: the anchors' spawned processes import this module.
    import ray
    import torch

    import shardopt

    return {
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "shardopt": shardopt.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def logger(name: str) -> Callable[[str], None]:
    """A benchmark's progress log: ``[name HH:MM:SS] message`` lines on stderr.

    Example:
        >>> log = logger("step_bench")
        >>> log("starting Ray")  # doctest: +SKIP
        [step_bench 12:00:00] starting Ray
    """

    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, whose ``--help`` shows its module docstring as written."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def parse_size(text: str) -> int:
    """A parameter count as the command lines take it.

    Example:
        >>> parse_size("10M"), parse_size("2.5k"), parse_size("1G"), parse_size("123")
        (10000000, 2500, 1000000000, 123)
    """
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text.strip()[-1:].upper())
    return int(float(text.strip()[:-1]) * scale) if scale else int(text)


def comma_list(
    parser: argparse.ArgumentParser, flag: str, text: str, known: Collection[str]
) -> list[str]:
    """The names in a comma-separated option; ``parser.error`` (exit 2) on one it does not know.

    Args:
        parser: Reports the error.
        flag: The option, as the error names it (``--algos``).
        text: The option's value (``"adamw, sgd"``).
        known: The names it may hold.
    """
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"{flag}: unknown {unknown}, choose from {sorted(known)}")
    return chosen


def fixed(value: float | None, width: int, digits: int = 2) -> str:
    """A table's number cell: right-aligned, ``digits`` after the point, ``-`` for none.

    Example:
        >>> fixed(3.14159, 7), fixed(None, 7), fixed(12.0, 5, 0)
        ('   3.14', '      -', '   12')
    """
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def write_results(name: str, results: dict[str, Any], out: pathlib.Path = RESULTS) -> pathlib.Path:
    """Writes ``results`` as ``<out>/<name>.json`` (creating the folder); returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def publish(
    name: str, report: dict[str, Any], table: str, out: pathlib.Path = RESULTS
) -> pathlib.Path:
    """Ends a run: the table into the report, the report to JSON, the table and the total printed.

    Args:
        name: The JSON file's name, without ``.json``.
        report: The run's report; its ``meta`` holds ``seconds``, the run's duration.
        table: The printed table; the report keeps it too, as a list of lines under ``table``.
        out: The results folder.

    Returns:
        The path of the JSON file.
    """
    report["table"] = table.splitlines()
    path = write_results(name, report, out)
    print(table)
    print(f"total {report['meta']['seconds']:.0f} s; raw numbers: {path}")
    return path
