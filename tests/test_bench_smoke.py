"""Smoke tests of the benchmarks (step_bench.py, split_bench.py, gpu_bench.py, grpc_bench.py):
their pieces run on tiny models, so they do not rot.

The benchmark's modules live next to the script, not in the package; the fixtures put that
folder on ``sys.path`` (spawned children inherit it). Everything runs on about 100k parameters
with one timed step: the in-process cell (torch, shardopt on the session's Ray, the floor), the
whole CLI with its table, JSON and plot, and the ZeRO and RPC anchors (a few seconds each); the
gRPC bench's gateway, raw servers and child client on 200k.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import pathlib
import sys
from types import ModuleType

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
TINY = 100_000


def _benchmark_module(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _benchmark_module("step_bench")


@pytest.fixture(scope="module")
def names() -> ModuleType:
    """The report module, which names the kernel and floor rows."""
    return _benchmark_module("step_report")


def test_transformer_shapes_fill_the_budget(bench):
    shapes = bench.transformer_shapes(TINY)
    n = bench.count_params(shapes)
    width = shapes[0][1][1]
    assert TINY - width < n <= TINY
    assert shapes[0][0] == "embed.weight"
    assert sum(len(shape) == 2 for _, shape in shapes) == 1 + 2 * 4  # embedding + 4 per layer


def test_in_process_cell_times_every_config(bench, names):
    shapes = bench.transformer_shapes(TINY)
    result = bench.run_in_process(
        shapes, "adamw", warmup=1, repeats=1, shard_counts=(2,), settle_s=0
    )
    expected = [
        *bench.LOCAL_VARIANTS,
        names.FUSED_1T,
        bench.shardopt_name(2),
        bench.shardopt_name(2, share_params=True),
        names.ADD,
        names.COPY,
        names.COPY_1T,
    ]
    assert sorted(result.records) == sorted(expected)
    for name, record in result.records.items():
        assert record["error"] is None, (name, record["error"])
        assert len(record["samples_ms"]) == 1 and record["median_ms"] > 0
    assert len(result.records[bench.shardopt_name(2)]["facts"]["host_pids"]) == 2
    assert result.memory[names.CLIENT] > 0
    n = bench.count_params(shapes)
    floors = names.floors(result.records, bench.ALGORITHMS["adamw"], n, cpus=2)
    assert 0 < floors["step_floor_ms"] < floors["shard_floor_ms"]
    assert floors["core_floor_ms"] > 0


def test_core_floor_takes_each_piece_at_its_fewest_cpu_ms(names):
    # one thread is the cheaper way to run both pieces: (30 + 2 * 9) CPU-ms over 2 cores
    assert names.core_floor(fused=16, fused_1t=30, copy=6, copy_1t=9, cpus=2) == 24
    # a copy that scales perfectly costs as much on all cores: 2 * 4 = 8 CPU-ms each
    assert names.core_floor(fused=16, fused_1t=30, copy=4, copy_1t=9, cpus=2) == 23
    # four cores: the same CPU-ms, spread wider
    assert names.core_floor(fused=8, fused_1t=30, copy=3, copy_1t=9, cpus=4) == 12


def test_cli_writes_table_json_and_plot(bench, names, tmp_path, capsys):
    args = "--sizes 100k --repeats 1 --warmup 1 --algos sgd --configs local,shardopt --shards 1"
    bench.main([*args.split(), "--settle", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "step_bench.json").read_text())
    configs = [r["config"] for r in report["records"]]
    assert configs == [
        "torch foreach",
        "torch fused",
        names.FUSED_1T,
        "torch default",
        "shardopt 1 shard",
        "shardopt 1 shard, share_params",
        names.ADD,
        names.COPY,
        names.COPY_1T,
        names.STEP_FLOOR,
        names.SHARD_FLOOR,
        names.CORE_FLOOR,
    ]
    fused = next(r for r in report["records"] if r["config"] == names.FUSED)
    assert math.isclose(fused["ratios"]["x torch fused"], 1.0)
    assert "shardopt 1 shard" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "step_bench.png").stat().st_size > 0


def test_zero_anchor_reports_both_configs(bench):
    shapes = bench.transformer_shapes(TINY)
    records, memory = bench.anchors.run_zero(shapes, ["sgd"], 1, 1, timeout_s=120)
    assert sorted(records["sgd"]) == sorted(bench.anchors.ZERO_CONFIGS.values())
    for name, record in records["sgd"].items():
        assert record["error"] is None, (name, record["error"])
        assert record["median_ms"] > 0 and len(record["ranks"]) == 2
    assert len(memory["sgd"]) == 2


def test_rpc_anchor_reports_steps(bench):
    shapes = bench.transformer_shapes(TINY)
    records, memory = bench.anchors.run_rpc(shapes, ["adamw"], 1, 1, timeout_s=120)
    record = records["adamw"][bench.anchors.RPC_CONFIG]
    assert record["error"] is None, record["error"]
    assert record["median_ms"] > 0
    assert len(memory["adamw"]) == 3  # the trainer and two parameter servers


def test_an_anchor_past_its_time_limit_is_recorded_not_raised(bench):
    shapes = bench.transformer_shapes(TINY)
    records, memory = bench.anchors.run_rpc(shapes, ["sgd"], 1, 1, timeout_s=0.5)
    record = records["sgd"][bench.anchors.RPC_CONFIG]
    assert record["error"].startswith("TimeoutError") and record["median_ms"] is None
    assert memory == {}


def test_a_failing_config_is_recorded_and_the_others_go_on(bench, names):
    shapes = bench.transformer_shapes(TINY)
    result = bench.run_in_process(shapes, "sgd", 1, 1, local=False, shard_counts=(0,), settle_s=0)
    assert "num_shards" in result.records[bench.shardopt_name(0)]["error"]
    assert result.records[names.ADD]["median_ms"] > 0


def test_split_bench_pieces_run():
    """benchmarks/split_bench.py on a small embedding: whole against split, and sparse bytes."""
    split_bench = _benchmark_module("split_bench")
    dominant = split_bench.dominant(4000, 2, repeats=1)
    assert dominant["largest_shard_vs_mean"]["whole"] > 1.5
    assert dominant["largest_shard_vs_mean"]["split"] < 1.1
    assert all(ms > 0 for ms in dominant["ms"].values())
    sparse = split_bench.sparse(2, steps=2, rows=4000, batch=16)
    assert sparse["sparse"]["pieces"] == 2
    assert sparse["dense_vs_sparse_bytes"] > 10  # 16 of 4000 rows touched, both ways


def test_gpu_bench_runs_on_a_cpu():
    """benchmarks/gpu_bench.py's client on a CPU (its --device cpu mode): every config steps,
    and each records the transport its shards really used (CUDA IPC falls back here)."""
    gpu_bench = _benchmark_module("gpu_bench")
    result = gpu_bench.BenchClient().run(20_000, "cpu", 1, 0, warmup=0, repeats=1)
    assert all(s["error"] is None and s["median_ms"] > 0 for s in result["samples"].values())
    assert result["transports"]["shardopt cuda_ipc"] == ["object_store"]
    assert result["transports"]["shardopt object_store after"] == ["object_store"]


def test_grpc_bench_times_every_row_against_its_anchors_and_floors():
    """benchmarks/grpc_bench.py on a small model, the client in this process and in a child
    process of its own: every row is timed in both phases (the in-cluster rows in the first),
    and every ratio is there, the one-copy-a-side floors included."""
    grpc_bench = _benchmark_module("grpc_bench")
    args = grpc_bench.parse_args(
        ["--size", "200K", "--repeats", "1", "--warmup", "0", "--settle", "0"]
    )
    report = grpc_bench.run(args)
    phases = report["phases"]
    assert set(phases) == set(grpc_bench.PHASES)
    rows = grpc_bench.RATE_ROWS + (grpc_bench.REMOTE, grpc_bench.STEP_RPC, grpc_bench.TORCH)
    for key, phase in phases.items():
        for name in rows:
            assert phase["samples"][name]["error"] is None, (key, name)
            assert phase["samples"][name]["median_ms"] > 0, (key, name)
        assert all(v is not None and v > 0 for v in phase["ratios"].values()), key
    ratios = phases["own_process"]["ratios"]
    assert f"push / {grpc_bench.COPIED_PUSH}" in ratios
    assert f"{grpc_bench.COPIED_PULL} / raw gRPC pull" in ratios
    assert "raw gRPC push, a copy a side" in grpc_bench.format_table(report)
