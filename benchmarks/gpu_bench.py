"""AdamW's step on a GPU: shardopt's GPU shards against torch's fused CUDA AdamW, per transport.

    python benchmarks/gpu_bench.py [--sizes 50M,500M] [--shards 2] [--repeats 7] [--out DIR]
    python benchmarks/gpu_bench.py --sizes 1M --device cpu      # the same code on a CPU (check)

For each size N (float32 parameters in 8 matrices of about N/8), it times one whole step:

* ``torch fused``: ``torch.optim.AdamW(fused=True)`` on the device, in the client's process (the
  anchor: what the shards run, without shardopt);
* ``shardopt object_store``: the client's parameters and gradients on the device, ``--shards``
  shards on the same device (a fraction of the GPU each); gradients and parameters cross
  through host memory and Ray's object store;
* ``shardopt cuda_ipc``: the same, through Ray Direct Transport (CUDA IPC): GPU to GPU.

The client is a Ray actor holding a fraction of the GPU (CUDA IPC needs one: Ray gives drivers
no GPU ids), so all three run in the same process on the same GPU. A step is timed from
``opt.step()`` until the device has finished (``torch.cuda.synchronize``); gradients stay set
between steps. The configurations take turns round-robin (the order rotating every round); each
figure is the median of ``--repeats`` steps after ``--warmup``. Each row records the transport
each shard really used (``shard_status()``): a request that cannot be met falls back to the
object store (on a CPU, ``cuda_ipc`` always does).

Prints a table (medians, ratios to torch fused) and writes every sample to
``<out>/gpu_bench_<device>.json`` (``<device>``: ``torch.cuda.get_device_name()``, as a file
name; ``cpu`` on a CPU).
"""

from __future__ import annotations

import os
import pathlib
import re
import time
from typing import Any

import ray
import torch

import shardopt

# isort: split
# the benchmark's own module, next to this file
from common import RESULTS, arg_parser, fixed, logger, parse_size, publish, round_robin, run_meta

log = logger("gpu_bench")
ANCHOR = "torch fused"
TRANSPORTS = ("object_store", "cuda_ipc")


def shapes_for(n: int, pieces: int = 8) -> list[tuple[int, int]]:
    """``pieces`` matrices of 1024 columns holding about ``n`` floats together."""
    rows = max(1, n // pieces // 1024)
    return [(rows, 1024)] * pieces


class BenchClient:
    """The client's process: a Ray actor on the GPU (or a CPU), where every config runs."""

    def run(
        self, size: int, device: str, shards: int, shard_gpus: float, warmup: int, repeats: int
    ) -> dict[str, Any]:
        torch.manual_seed(0)
        shapes = shapes_for(size)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def model() -> list[torch.Tensor]:
            params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            return params

        steps, transports, optimizers = {}, {}, []
        anchor = torch.optim.AdamW(model(), lr=1e-3, fused=True)
        steps[ANCHOR] = anchor.step
        actor_options = {"num_gpus": shard_gpus} if device == "cuda" else {}
        for transport in TRANSPORTS:
            name = f"shardopt {transport}"
            opt = shardopt.AdamW(
                model(), lr=1e-3, num_shards=shards, actor_options=actor_options,
                transport=transport, shared_memory=False,
            )  # fmt: skip
            optimizers.append(opt)
            transports[name] = [s.transport for s in opt.shard_status()]
            steps[name] = opt.step
        timed = {}
        for name, step in steps.items():

            def whole(step=step) -> None:
                step()
                sync()

            timed[name] = whole
        samples = round_robin(timed, warmup, repeats)
        for name, opt in zip(list(steps)[1:], optimizers):
            transports[name + " after"] = [s.transport for s in opt.shard_status()]
            opt.close()
        return {
            "params": sum(r * c for r, c in shapes),
            "samples": {k: v.to_json() for k, v in samples.items()},
            "transports": transports,
        }


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", default="50M,500M")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available())")
    start = time.perf_counter()
    here = str(pathlib.Path(__file__).resolve().parent)  # the client actor imports `common`
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    # the client and both optimizers' shards on one GPU (RDT shards need hosts of their own)
    share = 1.0 / (2 * args.shards + 1)
    log(f"device {device_name(args.device)}; Ray sees {gpus} GPU(s); {share:.2f} GPU each")
    client_gpus = share if args.device == "cuda" else 0
    client = ray.remote(BenchClient).options(num_gpus=client_gpus).remote()
    report: dict[str, Any] = {
        "meta": {**run_meta(), "device": device_name(args.device), "shards": args.shards},
        "sizes": {},
    }
    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        log(f"{text}: {args.warmup} warm-up + {args.repeats} timed steps per config")
        result = ray.get(
            client.run.remote(
                size, args.device, args.shards, share, args.warmup, args.repeats
            )  # fmt: skip
        )
        report["sizes"][text] = result
        anchor = result["samples"][ANCHOR]["median_ms"]
        for name, sample in result["samples"].items():
            median = sample["median_ms"]
            ratio = median / anchor if median is not None and anchor else None
            sample["ratio_to_anchor"] = ratio
            used = ",".join(sorted(set(result["transports"].get(name, ["-"]))))
            error = f"  error: {sample['error']}" if sample["error"] else ""
            rows.append(
                f"{text:>6} {name:<24} {used:<14} {fixed(median, 10)} {fixed(ratio, 7)}{error}"
            )
    ray.kill(client)
    report["meta"]["seconds"] = time.perf_counter() - start
    header = f"{'size':>6} {'config':<24} {'transport':<14} {'median ms':>10} {'x torch':>7}"
    table = "\n".join([f"AdamW step on {report['meta']['device']}", header, *rows])
    slug = re.sub(r"[^A-Za-z0-9]+", "_", report["meta"]["device"]).strip("_").lower()
    publish(f"gpu_bench_{slug}", report, table, args.out)


if __name__ == "__main__":
    main()
