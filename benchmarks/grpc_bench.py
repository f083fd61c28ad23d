"""The gRPC gateway, timed: remote steps and push/pull throughput against loopback's ceilings.

    python benchmarks/grpc_bench.py [--size 25M] [--repeats 7] [--quick]

On one model (float32 parameters shaped like a small transformer, ``--size`` of them, 25M by
default, about 100 MB; ``--quick``: 1M) and AdamW (lr 1e-3, weight decay 1e-2), it times

* shardopt remote: ``shardopt.AdamW(..., num_shards=2, address=..., token=...)`` against a
  gateway started in this process (``shardopt.gateway.serve("127.0.0.1", 0, ...)``); one step
  is PushGradients + Step + PullParameters;
* its pieces, through the raw stub on a session of their own: the PushGradients stream (from
  the header to the reply; then an untimed Step, so that every piece starts from the state a
  training loop leaves: nothing staged), the PullParameters stream (until every tensor is
  assembled, as the client does, into reused buffers) and the Step RPC alone (after an untimed
  push); both
  streams with chunks that span tensors, as the client sends and asks for them
  (``chunk_codec.SPANNING``: as many 1 MiB messages as the raw streams', one per tensor at
  least without it);
* shardopt in-cluster: the same class without ``address`` (the proxy talks to the Ray actors),
  with shared memory and with ``shared_memory=False`` (Ray's object store);
* torch fused: ``torch.optim.AdamW(fused=True)`` in the client's process, the floor;
* the anchors, over the same number of bytes: a raw gRPC stream of 1 MiB ``bytes`` messages
  to a trivial generic-handler server (identity serializers, messages built once, up front) in
  both directions, and a plain TCP socket on 127.0.0.1 in both directions;
* the floor of any design that copies each byte once on each side, over the same raw gRPC
  server: its sender encodes every message from the tensors as it goes (one copy:
  ``chunk_codec.spanning_chunks``, the encoder the client and the gateway use) and its receiver
  copies every message into memory it keeps (a buffer of shared memory for pushes, as the
  gateway's shards' buffers; a reused buffer for pulls, as the client's). The gateway's streams
  copy each byte once a side too, and parse, check and count what they receive besides:
  ``push / raw gRPC push, a copy a side`` is what that costs them. The copies themselves are
  ``raw gRPC push, a copy a side / raw gRPC push``.

Every server (gateway, raw gRPC, TCP) lives in this process. The client side runs twice: in
this process (phase 1: client and servers share one GIL) and in a child process of its own
(phase 2: the in-cluster rows stay in phase 1). Within a phase the measurements take turns
round-robin, the order rotating every round, after waiting for the CPUs to go quiet; each
figure is the median of ``--repeats`` rounds after ``--warmup``. MB are 10**6 bytes; a stream's
MB/s counts its tensor bytes (not the protobuf framing).

Prints a table (medians, spread, ratios) and writes every sample to
``benchmarks/results/grpc_bench.json``. On a 2-core machine the default run takes about 45 s
(3.5 GB peak in this process), ``--quick`` about 25 s, mostly starting Ray and the shards.

Talks to: a local Ray (``address="local"``), shardopt's gateway and remote client, grpc, sockets.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import pathlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import ray
import torch

import shardopt
from shardopt.core import chunk_codec, wire
from shardopt.core.proto import pb
from shardopt.gateway import serve

# isort: split
# the benchmark's own modules, next to this file
from common import (
    LOOPBACK,
    RESULTS,
    Measure,
    arg_parser,
    describe,
    logger,
    parse_size,
    publish,
    rotate,
    run_meta,
    timed,
    wait_for_quiet,
)
from workload import ALGORITHMS, clone_params, count_params, make_params, transformer_shapes

ADAMW = ALGORITHMS["adamw"]
NUM_SHARDS = 2
MESSAGE_LIMIT = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
]
RAW_SERVICE = "grpcbench.Raw"
MB = 1e6

TORCH = "torch AdamW fused (local)"
CORE_SHM = "shardopt in-cluster, shared memory"
CORE_STORE = "shardopt in-cluster, object store"
REMOTE = "shardopt remote step (gRPC)"
STEP_RPC = "Step RPC alone (raw stub)"
PUSH = "PushGradients stream"
PULL = "PullParameters stream"
GRPC_PUSH = "raw gRPC client stream"
GRPC_PULL = "raw gRPC server stream"
COPIED_PUSH = "raw gRPC push, a copy a side"
COPIED_PULL = "raw gRPC pull, a copy a side"
TCP_PUSH = "TCP client -> server"
TCP_PULL = "TCP server -> client"
STEP_ROWS = (TORCH, CORE_SHM, CORE_STORE, REMOTE, STEP_RPC)
RATE_ROWS = (PUSH, GRPC_PUSH, COPIED_PUSH, TCP_PUSH, PULL, GRPC_PULL, COPIED_PULL, TCP_PULL)
PHASES = {"same_process": "client in gateway's process", "own_process": "client in own process"}
log = logger("grpc_bench")


# ----- servers (this process) -----------------------------------------------------------------


def byte_chunks(nbytes: int, chunk_bytes: int = wire.CHUNK_BYTES) -> list[bytes]:
    """``nbytes`` random bytes as distinct ``chunk_bytes`` messages (no cache-warm reuse)."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy()
    return [data[o : o + chunk_bytes].tobytes() for o in range(0, nbytes, chunk_bytes)]


def raw_grpc_server(nbytes: int, tensors: list[torch.Tensor]) -> tuple[grpc.Server, int]:
    """A trivial gRPC server: ``Push`` counts the bytes it is sent, ``Pull`` streams ``nbytes``,
    both carrying ``bytes`` as they are (no serializers; ``Pull``'s messages built once here).
    ``PushLanded`` copies every message it is sent into shared memory it keeps (an anonymous
    shared mapping, the memory of the shards' buffers), one after the other; ``PullEncoded``
    streams ``tensors`` (``nbytes`` in all) encoded as it goes, by the gateway's encoder."""
    chunks = byte_chunks(nbytes)
    landing = mmap.mmap(-1, nbytes + (1 << 20))  # room for the messages' framing
    target = memoryview(landing)
    target[:] = bytes(len(target))  # touched once, as a shard's buffer is before a step

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(m) for m in requests).to_bytes(8, "little")

    def push_landed(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        at = 0
        for message in requests:
            end = min(at + len(message), len(target))
            target[at:end] = memoryview(message)[: end - at]
            at = end
        return at.to_bytes(8, "little")

    def pull(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from chunks

    def pull_encoded(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from chunk_codec.spanning_chunks(tensors)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(push),
        "PushLanded": grpc.stream_unary_rpc_method_handler(push_landed),
        "Pull": grpc.unary_stream_rpc_method_handler(pull),
        "PullEncoded": grpc.unary_stream_rpc_method_handler(pull_encoded),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    return server, port


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fills ``view`` from ``conn``; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


class TcpServer:
    """A TCP peer on 127.0.0.1: ``P<n>`` takes n bytes and acks one byte, ``G<n>`` sends n."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = bytearray(nbytes)
        self.payload = memoryview(byte_chunks(nbytes, nbytes)[0]) if nbytes else memoryview(b"")
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="tcp-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = memoryview(bytearray(9))
        target = memoryview(self.buffer)
        with conn:
            while _recv_exact(conn, head):
                n = int.from_bytes(head[1:], "little")
                if head[0] == ord("P"):
                    if not _recv_exact(conn, target[:n]):
                        return
                    conn.sendall(b"k")
                else:
                    conn.sendall(self.payload[:n])

    def close(self) -> None:
        self.sock.close()


# ----- the client side (this process or a child) ----------------------------------------------


def client_measures(spec: dict[str, Any]) -> tuple[dict[str, Measure], Callable[[], None]]:
    """The client's measurements against the servers named in ``spec``, and how to close them.

    ``spec``: ``num_params``, ``address`` (gateway), ``token``, ``raw_port``, ``tcp_port``.
    """
    shapes = transformer_shapes(spec["num_params"])
    base = make_params(shapes)
    nbytes = sum(p.numel() * p.element_size() for p in base)
    measures: dict[str, Measure] = {}
    closers: list[Callable[[], None]] = []

    local = torch.optim.AdamW(base, **ADAMW.hyperparameters, fused=True)
    measures[TORCH] = timed(local.step)

    model = clone_params(base)
    remote = shardopt.AdamW(
        model,
        num_shards=NUM_SHARDS,
        address=spec["address"],
        token=spec["token"],
        **ADAMW.hyperparameters,
    )
    closers.append(remote.close)
    measures[REMOTE] = timed(remote.step)

    channel = grpc.insecure_channel(spec["address"], options=CHANNEL_OPTIONS)
    closers.append(channel.close)
    stub = chunk_codec.stub(channel)  # the remote client's own stub
    metadata = (("authorization", f"Bearer {spec['token']}"),)
    grads = [p.grad for p in model]
    session_id = open_session(stub, metadata, model)
    closers.insert(
        0, lambda: stub.CloseSession(pb.SessionRef(session_id=session_id), metadata=metadata)
    )

    def push() -> float:
        start = time.perf_counter()
        reply = push_gradients(stub, metadata, session_id, grads)
        elapsed = time.perf_counter() - start
        if reply.bytes != nbytes:
            raise RuntimeError(f"PushGradients staged {reply.bytes} bytes of {nbytes}")
        # stepped, untimed, as a training loop does: the next piece finds nothing staged
        stub.Step(pb.StepRequest(session_id=session_id), metadata=metadata)
        return elapsed

    def step() -> float:
        push_gradients(stub, metadata, session_id, grads)
        start = time.perf_counter()
        stub.Step(pb.StepRequest(session_id=session_id), metadata=metadata)
        return time.perf_counter() - start

    staging = [torch.empty_like(p) for p in model]  # the client's reused pull buffers
    pull_metadata = metadata + chunk_codec.SPANNING  # as the client asks

    def pull() -> float:
        start = time.perf_counter()
        answers = stub.PullParameters(
            pb.PullParametersRequest(session_id=session_id), metadata=pull_metadata
        )
        chunk_codec.receive_parameters(answers, staging)
        return time.perf_counter() - start

    measures.update({PUSH: push, STEP_RPC: step, PULL: pull})

    raw = grpc.insecure_channel(f"{LOOPBACK}:{spec['raw_port']}", options=CHANNEL_OPTIONS)
    closers.append(raw.close)
    raw_push = raw.stream_unary(f"/{RAW_SERVICE}/Push")
    raw_pull = raw.unary_stream(f"/{RAW_SERVICE}/Pull")
    chunks = byte_chunks(nbytes)

    def grpc_push() -> float:
        start = time.perf_counter()
        got = int.from_bytes(raw_push(iter(chunks)), "little")
        elapsed = time.perf_counter() - start
        if got != nbytes:
            raise RuntimeError(f"the raw server counted {got} bytes of {nbytes}")
        return elapsed

    def grpc_pull() -> float:
        start = time.perf_counter()
        got = sum(len(m) for m in raw_pull(b""))
        elapsed = time.perf_counter() - start
        if got != nbytes:
            raise RuntimeError(f"the raw server sent {got} bytes of {nbytes}")
        return elapsed

    raw_push_landed = raw.stream_unary(f"/{RAW_SERVICE}/PushLanded")
    raw_pull_encoded = raw.unary_stream(f"/{RAW_SERVICE}/PullEncoded")
    inbox_view = memoryview(bytearray(nbytes + (1 << 20)))  # reused, as the client's buffers

    def copied_push() -> float:
        start = time.perf_counter()
        got = int.from_bytes(raw_push_landed(chunk_codec.spanning_chunks(grads)), "little")
        elapsed = time.perf_counter() - start
        if got < nbytes:
            raise RuntimeError(f"the raw server landed {got} bytes of {nbytes}")
        return elapsed

    def copied_pull() -> float:
        start = time.perf_counter()
        at = 0
        for message in raw_pull_encoded(b""):
            inbox_view[at : at + len(message)] = message
            at += len(message)
        elapsed = time.perf_counter() - start
        if at < nbytes:
            raise RuntimeError(f"the raw server sent {at} bytes of {nbytes}")
        return elapsed

    measures.update({GRPC_PUSH: grpc_push, GRPC_PULL: grpc_pull})
    measures.update({COPIED_PUSH: copied_push, COPIED_PULL: copied_pull})

    conn = socket.create_connection((LOOPBACK, spec["tcp_port"]))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    closers.append(conn.close)
    payload = memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    inbox = memoryview(bytearray(nbytes))
    ack = memoryview(bytearray(1))

    def tcp_push() -> float:
        start = time.perf_counter()
        conn.sendall(b"P" + nbytes.to_bytes(8, "little"))
        conn.sendall(payload)
        if not _recv_exact(conn, ack):
            raise ConnectionError("the TCP server closed")
        return time.perf_counter() - start

    def tcp_pull() -> float:
        start = time.perf_counter()
        conn.sendall(b"G" + nbytes.to_bytes(8, "little"))
        if not _recv_exact(conn, inbox):
            raise ConnectionError("the TCP server closed")
        return time.perf_counter() - start

    measures.update({TCP_PUSH: tcp_push, TCP_PULL: tcp_pull})

    def close() -> None:
        for closer in closers:
            try:
                closer()
            except Exception:  # a gateway already stopped: nothing left to release
                pass

    return measures, close


def open_session(stub: Any, metadata: Any, params: list[torch.Tensor]) -> str:
    """A session of its own for the raw stub's measurements (as tests/test_gateway.py opens)."""
    spec = pb.SessionSpec(
        optimizer="AdamW",
        hyperparameters=wire.encode_options(ADAMW.hyperparameters),
        params=[wire.spec_of(p) for p in params],
        num_shards=NUM_SHARDS,
    )

    def requests() -> Iterator[Any]:
        yield pb.OpenSessionRequest(spec=spec)
        yield from chunk_codec.encoded_chunks([p.detach() for p in params])

    return stub.OpenSession(requests(), metadata=metadata).session_id


def push_gradients(stub: Any, metadata: Any, session_id: str, grads: list[torch.Tensor]) -> Any:
    """One PushGradients stream of every gradient, as the remote client sends it."""
    header = pb.PushGradientsHeader(
        session_id=session_id,
        params=list(range(len(grads))),
        grads=[wire.spec_of(g) for g in grads],
    )

    def requests() -> Iterator[Any]:
        yield pb.PushGradientsRequest(header=header)
        yield from chunk_codec.spanning_chunks(grads)  # this gateway takes them (see its pulls)

    return stub.PushGradients(requests(), metadata=metadata + chunk_codec.SPANNING)


def client_main(spec_json: str) -> None:
    """The child process: the client's measurements, as JSON on the last line of stdout."""
    spec = json.loads(spec_json)
    measures, close = client_measures(spec)
    try:
        quiet = wait_for_quiet(timeout_s=spec["settle_s"])
        samples = rotate(measures, spec["warmup"], spec["repeats"])
    finally:
        close()
    report = {"quiet": quiet, "samples": {k: s.to_json() for k, s in samples.items()}}
    print(json.dumps(report), flush=True)


# ----- the run --------------------------------------------------------------------------------


def in_cluster(base: list[torch.nn.Parameter], shared_memory: bool | None) -> Any:
    return shardopt.AdamW(
        clone_params(base),
        num_shards=NUM_SHARDS,
        shared_memory=shared_memory,
        **ADAMW.hyperparameters,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    shapes = transformer_shapes(args.size)
    n = count_params(shapes)
    nbytes = 4 * n
    token = f"grpc-bench-{uuid.uuid4().hex}"
    report: dict[str, Any] = {
        "meta": {
            **run_meta(),
            "grpc": grpc.__version__,
            "torch_threads": torch.get_num_threads(),
            "num_params": n,
            "bytes": nbytes,
            "shapes": shapes,
            "algorithm": {"AdamW": ADAMW.hyperparameters},
            "num_shards": NUM_SHARDS,
            "chunk_bytes": wire.CHUNK_BYTES,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "phases": {},
    }
    log(f"Ray and the servers; {n:,} parameters ({nbytes / MB:.0f} MB)")
    gateway = serve(LOOPBACK, 0, tokens=[token])
    base = make_params(shapes)  # the in-cluster proxies' parameters, and the raw pull's bytes
    raw_server, raw_port = raw_grpc_server(nbytes, [p.detach() for p in base])
    tcp = TcpServer(nbytes)
    spec = {
        "num_params": args.size,
        "address": f"{LOOPBACK}:{gateway.port}",
        "token": token,
        "raw_port": raw_port,
        "tcp_port": tcp.port,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "settle_s": args.settle,
    }
    try:
        log("phase 1: the client in this process, with the in-cluster proxies")
        cores = {CORE_SHM: in_cluster(base, None), CORE_STORE: in_cluster(base, False)}
        report["meta"]["in_cluster_shared_memory"] = {
            name: list(opt.uses_shared_memory) for name, opt in cores.items()
        }
        del base  # its gradients; the raw server keeps the values
        measures, close = client_measures(spec)
        measures.update({name: timed(opt.step) for name, opt in cores.items()})
        try:
            quiet = wait_for_quiet(timeout_s=args.settle)
            samples = rotate(measures, args.warmup, args.repeats)
        finally:
            close()
            for opt in cores.values():
                opt.close()
            del measures, cores
            gc.collect()
        report["phases"]["same_process"] = {
            "quiet": quiet,
            "samples": {k: s.to_json() for k, s in samples.items()},
        }
        log("phase 2: the client in a child process of its own")
        report["phases"]["own_process"] = run_child(spec, args.timeout)
    finally:
        gateway.stop(1)
        raw_server.stop(1).wait()
        tcp.close()
    add_figures(report, nbytes)
    report["meta"]["seconds"] = time.perf_counter() - started
    return report


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Runs :func:`client_main` in a child process; its report, or the error for every row."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--client", json.dumps(spec)]
    try:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, text=True, timeout=timeout_s, check=True
        )
        return json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:  # reported in the table and the JSON
        error = describe(exc)
        log(f"the child client failed: {error}")
        return {"error": error, "samples": {}}


def add_figures(report: dict[str, Any], nbytes: int) -> None:
    """Medians per phase (ms for steps, MB/s for streams) and the ratios between them."""
    core = report["phases"]["same_process"]["samples"]
    for phase in report["phases"].values():
        samples = phase["samples"]

        def ms(name: str, samples: dict = samples) -> float | None:
            return samples.get(name, {}).get("median_ms")

        def rate(name: str) -> float | None:
            value = ms(name)
            return nbytes / MB / (value / 1e3) if value else None

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a and b else None

        remote = ms(REMOTE)
        pieces = [ms(k) for k in (PUSH, STEP_RPC, PULL)]
        parts = sum(pieces) if all(pieces) else None
        phase["ms"] = {name: ms(name) for name in STEP_ROWS}
        phase["mb_per_s"] = {name: rate(name) for name in RATE_ROWS}
        phase["ratios"] = {
            f"remote / {CORE_SHM}": ratio(remote, ms(CORE_SHM, core)),
            f"remote / {CORE_STORE}": ratio(remote, ms(CORE_STORE, core)),
            f"remote / {TORCH}": ratio(remote, ms(TORCH)),
            "push / raw gRPC push": ratio(rate(PUSH), rate(GRPC_PUSH)),
            f"push / {COPIED_PUSH}": ratio(rate(PUSH), rate(COPIED_PUSH)),
            f"{COPIED_PUSH} / raw gRPC push": ratio(rate(COPIED_PUSH), rate(GRPC_PUSH)),
            "push / TCP push": ratio(rate(PUSH), rate(TCP_PUSH)),
            "pull / raw gRPC pull": ratio(rate(PULL), rate(GRPC_PULL)),
            f"pull / {COPIED_PULL}": ratio(rate(PULL), rate(COPIED_PULL)),
            f"{COPIED_PULL} / raw gRPC pull": ratio(rate(COPIED_PULL), rate(GRPC_PULL)),
            "pull / TCP pull": ratio(rate(PULL), rate(TCP_PULL)),
            "remote / (push + Step + pull)": ratio(remote, parts),
        }


# ----- the table ------------------------------------------------------------------------------


def _spread(record: dict[str, Any]) -> str:
    values, median = record.get("samples_ms") or [], record.get("median_ms")
    if not values or not median:
        return ""
    return f" ±{50 * (max(values) - min(values)) / median:.0f}%"


def _cell(phase: dict[str, Any], name: str, unit: str) -> str:
    record = phase.get("samples", {}).get(name)
    if record is None:
        return "-" if "error" not in phase else "failed"
    if record.get("error"):
        return "failed"
    value = phase["ms" if unit == "ms" else "mb_per_s"].get(name)
    return f"{value:,.1f}{_spread(record)}" if value is not None else "-"


def format_table(report: dict[str, Any]) -> str:
    meta = report["meta"]
    phases = [report["phases"].get(key, {"samples": {}}) for key in PHASES]
    head = f"{'':38} {'':5}" + "".join(f" {title:>28}" for title in PHASES.values())
    lines = [
        f"gRPC gateway: AdamW over {meta['num_params']:,} float32 parameters "
        f"({meta['bytes'] / MB:.0f} MB), {meta['num_shards']} shards, {meta['cpus']} CPUs; "
        f"median of {meta['repeats']} after {meta['warmup']} warm-up (± half the range)",
        head,
    ]
    for unit, rows in (("ms", STEP_ROWS), ("MB/s", RATE_ROWS)):
        for name in rows:
            cells = "".join(f" {_cell(phase, name, unit):>28}" for phase in phases)
            lines.append(f"{name:38} {unit:5}{cells}")
    lines.append("ratios (medians; in-cluster rows from the first column's phase)")
    keys = next((list(p["ratios"]) for p in phases if "ratios" in p), [])
    for key in keys:
        cells = ""
        for phase in phases:
            value = phase.get("ratios", {}).get(key)
            cells += f" {(f'{value:.2f}x' if value is not None else '-'):>28}"
        lines.append(f"{key:44}{cells}")
    errors = [
        f"  {title}, {name}: {record['error']}"
        for key, title in PHASES.items()
        for name, record in report["phases"].get(key, {}).get("samples", {}).items()
        if record.get("error")
    ]
    errors += [
        f"  {title}: {report['phases'][key]['error']}"
        for key, title in PHASES.items()
        if report["phases"].get(key, {}).get("error")
    ]
    return "\n".join(lines + (["errors:", *errors] if errors else []))


# ----- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--size", default=None, help="parameter count (default 25M; quick 1M)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M, 5 rounds, < 60 s")
    parser.add_argument(
        "--settle", type=float, default=None, help="most seconds to wait for idle CPUs (15)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="child client limit, s")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # the child's spec
    args = parser.parse_args(argv)
    args.size = parse_size(args.size or ("1M" if args.quick else "25M"))
    args.repeats = args.repeats or (5 if args.quick else 7)
    args.settle = args.settle if args.settle is not None else (3.0 if args.quick else 15.0)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.client is not None:
        client_main(args.client)
        return
    own_ray = not ray.is_initialized()
    if own_ray:  # "local": never join another cluster running on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        report = run(args)
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
    publish("grpc_bench", report, format_table(report), args.out)


if __name__ == "__main__":
    main()
