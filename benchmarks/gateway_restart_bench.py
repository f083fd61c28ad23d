"""A gateway restart, timed: the pause a client sees, and what keeping sessions costs a step.

    python benchmarks/gateway_restart_bench.py [--size 4M] [--steps 15] [--restarts 3]
        [--lbfgs-size 1M] [--lbfgs-steps 8]

On one model (``--size`` float32 parameters in 4 tensors, 4M by default, 16 MB) and AdamW
(lr 1e-3), with 2 shards, it measures

* per-step overhead: a remote client (``shardopt.AdamW(..., address=...)``) against two
  ``shardopt serve`` processes on the same Ray, one with ``--session-store`` and one without,
  stepping in turns (``--steps`` timed steps each, after 3 untimed); the ratio of their median
  steps is what the persistence adds (its records and beats are off the step's path);
* the same for ``shardopt.LBFGS`` (``--lbfgs-size`` float64 parameters in 4 tensors, a
  quadratic loss, ``max_iter=5``, 1 shard): with the store, each step marks its record before
  its first evaluation and records LBFGS's state after it (two store calls, each saved to the
  GCS's key-value store), which is on the step's path;
* the pause: the gateway with the store is killed (SIGKILL) between two steps and the same
  command started again at once; the step that spans it is the pause the training loop sees,
  beside a gateway process's start-up (from its start to its "serving on" line: importing
  torch and Ray, joining the cluster, resuming the session) and, within it, the resume (its
  ``sessions_resumed`` event: waiting for the killed gateway's beats to go stale, reading the
  records, attaching to the shards). ``--restarts`` times, median reported;
* the pause of a shard group member: a second remote client on the gateway with the store, the
  one rank of a sync group (``group=...``, world size 1, 2 shards, same model), steps across
  each restart at the same time as the first (its member is re-attached to its rank by the new
  gateway, and its step, sent again with its id, is answered once).

Both gateways are subprocesses joined to a local Ray that this process starts. Prints a table
and writes every sample to ``benchmarks/results/gateway_restart_bench.json``.

Talks to: a local Ray, two ``shardopt serve`` processes, shardopt's remote client.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

import ray
import torch
from common import arg_parser, logger, parse_size, publish, run_meta

import shardopt
from shardopt.core.events import parse_event

log = logger("gateway_restart_bench")
TOKEN = "bench-restart-token-0123456789"


def start(
    tokens: str, port: int, store: str | None
) -> tuple[subprocess.Popen, str, float, float | None]:
    """A ``shardopt serve`` process; returns it, its address, its start-up seconds and the
    seconds its resume of the store's sessions took (None: no such line)."""
    flags = ["--session-store", store] if store else []
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "shardopt", "serve", "--port", str(port),
            "--token-file", tokens, "--ray-address", ray.get_runtime_context().gcs_address,
            *flags,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    resume_s = None
    for line in process.stdout:
        if "event=sessions_resumed" in line:
            resume_s = float(parse_event(line[line.index("event=") :].strip())["seconds"])
        if line.startswith("serving on "):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # drain
            address = line.strip().removeprefix("serving on ")
            return process, address, time.perf_counter() - began, resume_s
    raise RuntimeError(f"the gateway did not start (exit code {process.wait()})")


def model_of(size: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(size // 4, dtype=dtype, requires_grad=True) for _ in range(4)]


def one_step(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def lbfgs_step(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> float:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((p - 1.0) ** 2 * (1 + i)).sum() for i, p in enumerate(params))
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    return time.perf_counter() - start


def alternate(steps: int, warmup: int, step: Callable[[str], float]) -> dict[str, list[float]]:
    """``step("plain")`` and ``step("store")`` in turns, each first every other round (after
    ``warmup`` untimed rounds): the milliseconds of each one's ``steps`` timed steps."""
    samples: dict[str, list[float]] = {"plain": [], "store": []}
    for i in range(steps + warmup):
        for name in ("plain", "store") if i % 2 else ("store", "plain"):
            seconds = step(name)
            if i >= warmup:
                samples[name].append(seconds * 1e3)
    return samples


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--size", type=parse_size, default=4_000_000)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--lbfgs-size", type=parse_size, default=1_000_000)
    parser.add_argument("--lbfgs-steps", type=int, default=8)
    args = parser.parse_args()
    began = time.perf_counter()
    ray.init(address="local", include_dashboard=False)
    tmp = tempfile.mkdtemp()
    tokens = os.path.join(tmp, "tokens")
    with open(tokens, "w") as f:
        f.write(TOKEN + "\n")
    store = f"bench-{uuid.uuid4().hex[:8]}"
    log("starting two gateways")
    plain, plain_address, _, _ = start(tokens, 0, None)
    kept, kept_address, first_start, _ = start(tokens, 0, store)
    processes = [plain, kept]
    try:
        params = {name: model_of(args.size) for name in ("plain", "store")}
        opts = {
            name: shardopt.AdamW(
                params[name],
                lr=1e-3,
                address=address,
                token=TOKEN,
                num_shards=2,
                reconnect_timeout=120,
            )  # fmt: skip
            for name, address in (("plain", plain_address), ("store", kept_address))
        }
        samples = alternate(args.steps, 3, lambda name: one_step(params[name], opts[name]))
        lbfgs_params = {name: model_of(args.lbfgs_size, torch.float64) for name in samples}
        lbfgs = {
            name: shardopt.LBFGS(
                lbfgs_params[name],
                max_iter=5,
                history_size=10,
                address=address,
                token=TOKEN,
                num_shards=1,
                reconnect_timeout=120,
            )  # fmt: skip
            for name, address in (("plain", plain_address), ("store", kept_address))
        }
        lbfgs_samples = alternate(
            args.lbfgs_steps, 2, lambda name: lbfgs_step(lbfgs_params[name], lbfgs[name])
        )
        for opt in lbfgs.values():
            opt.close()
        group_params = model_of(args.size)
        group_opt = shardopt.AdamW(
            group_params, lr=1e-3, address=kept_address, token=TOKEN, num_shards=2,
            group=f"bench-{uuid.uuid4().hex[:6]}", world_size=1, rank=0, reconnect_timeout=120,
        )  # fmt: skip
        group_ms = [one_step(group_params, group_opt) * 1e3 for _ in range(args.steps + 3)][3:]
        port = int(kept_address.rsplit(":", 1)[1])
        pauses, startups, resumes, group_pauses = [], [first_start], [], []
        for r in range(args.restarts):
            log(f"restart {r + 1}/{args.restarts}")
            kept.send_signal(signal.SIGKILL)
            kept.wait()
            box: list = []
            thread = threading.Thread(target=lambda out=box: out.append(start(tokens, port, store)))
            thread.start()
            member = threading.Thread(
                target=lambda: group_pauses.append(one_step(group_params, group_opt))
            )
            member.start()
            pauses.append(one_step(params["store"], opts["store"]))
            member.join()
            thread.join()
            kept, _, startup, resume_s = box[0]
            processes.append(kept)
            startups.append(startup)
            resumes.append(resume_s)
        for opt in [*opts.values(), group_opt]:
            opt.close()
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    plain_ms = statistics.median(samples["plain"])
    store_ms = statistics.median(samples["store"])
    lbfgs_plain_ms = statistics.median(lbfgs_samples["plain"])
    lbfgs_store_ms = statistics.median(lbfgs_samples["store"])
    pause_s = statistics.median(pauses)
    group_pause_s = statistics.median(group_pauses)
    group_step_ms = statistics.median(group_ms)
    startup_s = statistics.median(startups)
    resume_s = statistics.median([r for r in resumes if r is not None] or [float("nan")])
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    table = "\n".join(
        [
            f"gateway restart, {args.size / 1e6:g}M float32 params, AdamW, 2 shards "
            f"(load average {' '.join(load)})",
            f"  step, no session store     {plain_ms:9.1f} ms",
            f"  step, with session store   {store_ms:9.1f} ms   ratio {store_ms / plain_ms:.3f}",
            f"  LBFGS step ({args.lbfgs_size / 1e6:g}M float64, max_iter 5), no store "
            f"{lbfgs_plain_ms:9.1f} ms",
            f"  LBFGS step, with session store   {lbfgs_store_ms:9.1f} ms   ratio "
            f"{lbfgs_store_ms / lbfgs_plain_ms:.3f}",
            f"  pause across a SIGKILL + restart  {pause_s:6.2f} s  "
            f"({pause_s * 1e3 / plain_ms:.0f} steps)",
            f"  group member (sync, 1 rank): step {group_step_ms:9.1f} ms   ratio "
            f"{group_step_ms / store_ms:.3f} of the plain session's; pause across the "
            f"restart {group_pause_s:6.2f} s",
            f"  a gateway's start-up (process start to serving)  {startup_s:6.2f} s",
            f"    of which resuming the session (waiting out the old beats, attaching)  "
            f"{resume_s:6.2f} s",
        ]
    )
    report = {
        "meta": {**run_meta(), "seconds": time.perf_counter() - began, "loadavg": load},
        "step_ms": samples,
        "lbfgs_step_ms": lbfgs_samples,
        "pause_s": pauses,
        "group_step_ms": group_ms,
        "group_pause_s": group_pauses,
        "startup_s": startups,
        "resume_s": resumes,
    }
    publish("gateway_restart_bench", report, table)


if __name__ == "__main__":
    main()
