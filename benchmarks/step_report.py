"""The step benchmark's report: floors from the kernels, ratios, the table and the plot.

Reads the report dict that ``step_bench.run`` builds (records, cells, phases, meta) and adds
nothing to it but each record's ratios.

Talks to: :mod:`workload` for the algorithms' labels and bytes, :mod:`common` for number
cells; matplotlib, if installed.
"""

from __future__ import annotations

import pathlib
import statistics
from typing import Any

# isort: split
# the benchmark's own modules, next to this file
from common import fixed
from workload import ALGORITHMS, Algorithm

ADD, COPY = "add_ (N floats)", "copy_ (N floats)"
COPY_1T, FUSED_1T = "copy_ (N floats), 1 thread", "torch fused, 1 thread"
STEP_FLOOR, SHARD_FLOOR, CORE_FLOOR = "step floor", "shard-path floor", "core floor"
FOREACH, FUSED = "torch foreach", "torch fused"
CLIENT = "client (local + shardopt configs + floor)"


def floors(
    records: dict[str, dict[str, Any]], spec: Algorithm, n: int, cpus: int
) -> dict[str, float]:
    """Bandwidths from the kernels, the least step time the step's bytes allow, and the least
    time the CPU work of a step that copies allows on ``cpus`` cores (:func:`core_floor`)."""
    t_add, t_copy = records.get(ADD, {}).get("median_ms"), records.get(COPY, {}).get("median_ms")
    if not t_add or not t_copy:
        return {}
    step = spec.bytes_per_param / 12 * t_add  # add_ moves 12 B per float: read a, b; write a
    out = {
        "add_GBps": 12 * n / t_add / 1e6,
        "copy_GBps": 8 * n / t_copy / 1e6,
        "bytes_per_param": spec.bytes_per_param,
        "step_floor_ms": step,
        "shard_floor_ms": step + 2 * t_copy,
    }
    t_fused, t_fused_1t, t_copy_1t = (
        records.get(k, {}).get("median_ms") for k in (FUSED, FUSED_1T, COPY_1T)
    )
    if t_fused and t_fused_1t and t_copy_1t:
        out["core_floor_ms"] = core_floor(t_fused, t_fused_1t, t_copy, t_copy_1t, cpus)
    return out


def core_floor(fused: float, fused_1t: float, copy: float, copy_1t: float, cpus: int) -> float:
    """The least wall time of a step that copies every gradient in and every parameter out,
    from the CPU time its pieces take: torch's fused update over the N parameters, and two
    copies of N floats. Each piece costs at least the fewer CPU-milliseconds of its two timings
    (on one thread, or on all ``cpus`` threads at ``cpus`` times its wall time), and ``cpus``
    cores give at most ``cpus`` CPU-milliseconds per millisecond, however the pieces are split,
    overlapped or pipelined. Contention between pieces that share the memory bus only adds."""
    work = min(fused_1t, cpus * fused) + 2 * min(copy_1t, cpus * copy)
    return work / cpus


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each record's median over (a) foreach, (a) fused, (e) step floor and shard-path floor."""
    by_cell: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in records:
        by_cell.setdefault((r["size"], r["algo"]), {})[r["config"]] = r.get("median_ms")
    for r in records:
        anchors_ms = by_cell[(r["size"], r["algo"])]
        r["ratios"] = {
            f"x {ref}": (r["median_ms"] / anchors_ms[ref])
            if r.get("median_ms") and anchors_ms.get(ref)
            else None
            for ref in (FOREACH, FUSED, STEP_FLOOR, SHARD_FLOOR, CORE_FLOOR)
        }


def format_table(report: dict[str, Any]) -> str:
    """The printed report: one row per configuration, then floors, drift and peak memory."""
    meta = report["meta"]
    lines = [
        f"one optimizer step, float32, median of {meta['repeats']} after {meta['warmup']} "
        f"warm-up; {meta['cpus']} CPUs, torch {meta['torch']}, ray {meta['ray']}",
        f"{'size':<6}{'algorithm':<19}{'config':<28}{'median ms':>10}{'IQR %':>7}"
        f"{'x foreach':>10}{'x fused':>9}{'x step fl':>10}{'x shard fl':>11}{'x core fl':>10}",
    ]

    last = None
    for r in report["records"]:
        cell = (r["size"], r["algo"])
        head = (r["size"], ALGORITHMS[r["algo"]].label) if cell != last else ("", "")
        last = cell
        q = r.get("ratios", {})
        mark = " *" if r.get("own_processes") else ""
        row = f"{head[0]:<6}{head[1]:<19}{r['config'] + mark:<28}"
        if r.get("error"):
            row += f"  failed: {r['error'].splitlines()[-1][:70]}"
        else:
            row += (
                f"{fixed(r.get('median_ms'), 10, 1)}{fixed(_iqr_pct(r.get('samples_ms')), 7, 0)}"
                f"{fixed(q.get('x ' + FOREACH), 10)}"
                f"{fixed(q.get('x ' + FUSED), 9)}{fixed(q.get('x ' + STEP_FLOOR), 10)}"
                f"{fixed(q.get('x ' + SHARD_FLOOR), 11)}{fixed(q.get('x ' + CORE_FLOOR), 10)}"
            )
        lines.append(row)
    lines.append(
        "IQR %: interquartile range over the median. step floor: the step's bytes (AdamW 28, SGD "
        "20 per param)\nat add_'s bandwidth; shard-path floor: step floor + 2 copies of N floats "
        "(grads in, params out);\ncore floor: the least time those copies and torch's fused "
        "update allow with every core busy (their\nfewest CPU-ms, on one thread or on all, over "
        "the cores).\n* timed in processes of their own after the cell, so their "
        "ratios span two phases: see the drift lines."
    )
    for c in report["cells"]:
        f = c.get("floors") or {}
        label = f"{c['size']} {ALGORITHMS[c['algo']].label}"
        if f:
            lines.append(
                f"  {label}: add_ {f['add_GBps']:.1f} GB/s, copy_ {f['copy_GBps']:.1f} GB/s"
            )
        busy = c.get("quiet_before_timing", {}).get("cpu_busy", 0.0)
        if busy > 0.2:
            lines.append(f"  {label}: CPUs {busy:.0%} busy before timing began (other work)")
    for p in report.get("phases", []):
        cells = [_ms(c["kernels"].get(ADD)) for c in report["cells"] if c["size"] == p["size"]]
        before, after = p["kernels_before"].get(ADD), p["kernels_after"].get(ADD)
        lines.append(
            f"  drift, {p['size']} {p['group']}: add_ {_ms(before)} ms before and {_ms(after)} ms "
            f"after it, {' / '.join(cells) or '-'} ms in the cells"
        )
    lines.append("")
    lines.append("peak RSS (MiB) by process while its configurations ran; pages of shared memory")
    lines.append("(Ray's object store, /dev/shm) count in every process that touched them")
    for c in report["cells"]:
        label = f"{c['size']} {ALGORITHMS[c['algo']].label}"
        for what, value in c.get("memory", {}).items():
            lines.append(f"  {label:<24}{what:<52}{_mib(value):>8}")
            label = ""
    whole = _mib(meta.get("client_peak_rss_bytes"))
    lines.append(f"  client peak RSS over the whole run: {whole} MiB")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value else "-"


def _iqr_pct(samples: list[float] | None) -> float | None:
    if not samples or len(samples) < 2:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return 100 * (q3 - q1) / statistics.median(samples)


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def plot(report: dict[str, Any], path: pathlib.Path) -> str | None:
    """Step time against parameter count, log-log, one line per configuration and algorithm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    algos = list(dict.fromkeys(r["algo"] for r in report["records"]))
    fig, axes = plt.subplots(1, len(algos), figsize=(7 * len(algos), 5), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        rows = [r for r in report["records"] if r["algo"] == algo and r.get("median_ms")]
        for config in dict.fromkeys(r["config"] for r in rows):
            if config in (ADD, COPY):
                continue
            points = sorted(
                (r["num_params"], r["median_ms"]) for r in rows if r["config"] == config
            )
            style = "--" if config in (STEP_FLOOR, SHARD_FLOOR) else "-"
            ax.plot(*zip(*points), style, marker="o", label=config)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{ALGORITHMS[algo].label}: one step")
        ax.set_xlabel("parameters (float32)")
        ax.set_ylabel("step time (ms, median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
