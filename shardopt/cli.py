"""The ``shardopt`` command line: one argparse parser with a subcommand per task.

Owns argument parsing, logging set-up and printing; the work itself lives in library modules
(``shardopt demo`` runs :func:`shardopt.demo.run`). Each subcommand is one ``_add_<name>``
function that adds its parser to the subparsers and sets ``handler``, a function taking the
parsed arguments and returning the exit code; :data:`COMMANDS` lists them in ``--help`` order.
A command with subcommands of its own (``ckpt inspect``/``ckpt export``) adds a nested
subparsers object the same way.

Talks to: the library modules each subcommand runs (imported when the subcommand runs).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from shardopt import __version__
from shardopt.cli_status import add_log_level, add_status

if TYPE_CHECKING:
    from shardopt.gateway.quotas import Limits

Subparsers = argparse._SubParsersAction
"""What ``ArgumentParser.add_subparsers()`` returns; each ``_add_<name>`` adds a parser to it."""


def _bounded(kind: type, low: int, strict: bool) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` number above ``low`` (``strict``) or at least ``low``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (value > low if strict else value >= low):
            bound = f"{'>' if strict else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, 1, strict=False)
_positive_float = _bounded(float, 0, strict=True)
_non_negative_int = _bounded(int, 0, strict=False)
_non_negative_float = _bounded(float, 0, strict=False)


def _add_key_file(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--checkpoint-key-file",
        metavar="FILE",
        help=(
            f"file with the checkpoint signing key (HMAC-SHA256, 16+ bytes): {what} "
            "(default: $SHARDOPT_CHECKPOINT_KEY_FILE; none: checksums only)"
        ),
    )


def _checkpoint_key(args: argparse.Namespace) -> bytes | None:
    """The key from ``--checkpoint-key-file``, else from $SHARDOPT_CHECKPOINT_KEY_FILE, else None.

    Raises:
        SystemExit: the file is missing or holds too short a key (the message says which).
    """
    import os

    from shardopt.checkpoint.integrity import KEY_ENV, read_key

    path = args.checkpoint_key_file or os.environ.get(KEY_ENV)
    if not path:
        return None
    try:
        return read_key(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"shardopt: {err}") from None


def _resources(text: str) -> dict[str, float]:
    """``CPU=1,GPU=0.5`` as a dict."""
    bundle = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            bundle[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=NUMBER[,KEY=NUMBER...], got {text!r}")
    return bundle


# ----- shardopt demo ------------------------------------------------------------------------


def _add_demo(subparsers: Subparsers) -> None:
    from shardopt.demo import DEFAULT_EPOCHS, HIDDEN

    parser = subparsers.add_parser(
        "demo",
        help="train a small MLP with shardopt.AdamW and with torch.optim.AdamW, and compare",
        description=(
            f"Trains an MLP (64-{HIDDEN}-10) on scikit-learn's bundled digits data set twice "
            "from the same initial weights over the same minibatches: once with "
            "shardopt.AdamW, its state sharded over Ray actors, and once with "
            "torch.optim.AdamW. Prints both runs' test accuracy, losses and timings, and the "
            "largest difference between their final parameters (expected: 0.0). Uses the Ray "
            "cluster in reach (RAY_ADDRESS), else starts an embedded local Ray for the run."
        ),
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULT_EPOCHS,
        help="passes over the 1347 training samples (default: %(default)s)",
    )
    parser.add_argument(
        "--shards",
        type=_positive_int,
        default=2,
        help="shard actors holding the optimizer state (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="samples per minibatch (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, the train/test split and the minibatch order "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the training progress bars"
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from shardopt.demo import format_report, run

    result = run(
        epochs=args.epochs,
        num_shards=args.shards,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(format_report(result))
    return 0 if result["params_equal"] else 1


# ----- shardopt ckpt ------------------------------------------------------------------------


def _add_ckpt(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ckpt",
        help="inspect or export a shardopt checkpoint",
        description=(
            "Work with a checkpoint written by optimizer.save_checkpoint(path): a "
            "torch.distributed.checkpoint directory (or object store prefix, e.g. "
            "s3://bucket/run/step-100, with credentials from the environment) with one data "
            "file per shard."
        ),
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    inspect = verbs.add_parser(
        "inspect",
        help="files, integrity, parameters, dtypes, sizes and step of a checkpoint",
        description=(
            "Checks the commit record, the signature (with a key) and every data file's "
            "checksum, and summarises the checkpoint. Nothing is unpickled that the record "
            "does not cover, and then only DCP's metadata classes and weights_only values."
        ),
    )
    inspect.add_argument("path", help="the checkpoint directory or URL")
    _add_key_file(inspect, "refuse a checkpoint not signed with it")
    inspect.set_defaults(handler=_run_ckpt_inspect)
    export = verbs.add_parser(
        "export",
        help="write a checkpoint as a torch.optim state dict (torch.save)",
        description=(
            "Writes OUT.pt, loadable with torch.optim.<Name>(params).load_state_dict("
            "torch.load(OUT.pt)). Checks what inspect checks first and unpickles nothing "
            "beyond DCP's metadata classes and weights_only values: the safe way to convert a "
            "checkpoint from elsewhere (torch's dcp_to_torch_save unpickles with plain pickle)."
        ),
    )
    export.add_argument("path", help="the checkpoint directory or URL")
    _add_key_file(export, "refuse a checkpoint not signed with it")
    export.add_argument("out", help="the .pt file to write")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(handler=_run_ckpt_export)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} GB"


def _run_ckpt_inspect(args: argparse.Namespace) -> int:
    from shardopt.checkpoint.format import describe

    key = _checkpoint_key(args)
    try:
        info = describe(args.path, key=key)
    except (OSError, ImportError, ValueError, TypeError, KeyError) as err:  # hostile or unreachable
        info = {"path": args.path, "integrity": f"FAILED: {err}"}
    print(f"checkpoint {info['path']}")
    print(f"  integrity: {info['integrity']}")
    if "signature" in info:
        print(f"  signature: {info['signature']}")
    for name, size in info.get("data_files", {}).items():
        print(f"  data file {name}: {_size(size)}")
    if "params_with_state" in info:
        print(f"  parameters with state: {info['params_with_state']}, step: {info['step']}")
        for group in info["param_groups"]:
            print(f"  param group: {group}")
        for key, sizes in sorted(info["state_tensors"].items()):
            text = ", ".join(f"{dtype} {_size(n)}" for dtype, n in sizes.items())
            print(f"  state {key!r}: {text}")
    return 0 if info["integrity"] == "ok" else 1


def _run_ckpt_export(args: argparse.Namespace) -> int:
    from shardopt.checkpoint.format import export

    key = _checkpoint_key(args)
    try:
        count = export(args.path, args.out, progress=not args.no_progress, key=key)
    except (OSError, ImportError, ValueError) as err:
        print(f"shardopt ckpt export: {err}")
        return 1
    print(f"wrote {args.out}: state of {count} parameters")
    return 0


# ----- shardopt serve -----------------------------------------------------------------------


def _add_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the gRPC optimizer gateway for clients outside the Ray cluster",
        description=(
            "Starts (or joins, with --ray-address or RAY_ADDRESS) a Ray cluster and serves "
            "shardopt's optimizer service (protos/shardopt/v1) on HOST:PORT, with gRPC health "
            "checking and reflection. Clients use shardopt.<Name>(params, ..., "
            "address='HOST:PORT', token=...). Every call needs a bearer token from "
            "--token-file unless --no-auth is given; token holders are tenants, each held to "
            "the quotas below (see SECURITY.md). SIGTERM or Ctrl-C shut down gracefully: "
            "health turns NOT_SERVING, calls in flight get --grace seconds, sessions close. "
            "Prints 'serving on HOST:PORT' once ready. An embedded Ray (no --ray-address) "
            "needs Ray's token auth: Ray listens on all interfaces, whatever --host says."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=50051, help="port (0: any free one) (default: %(default)s)"
    )
    parser.add_argument(
        "--ray-address", help="a Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument("--token-file", help="accepted bearer tokens, one per line")
    parser.add_argument(
        "--no-auth", action="store_true", help="serve without tokens (loopback development only)"
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain for TLS")
    parser.add_argument("--tls-key", help="PEM private key for TLS")
    parser.add_argument(
        "--checkpoint-dir",
        help="where clients' SaveCheckpoint/LoadCheckpoint paths live: a directory every Ray "
        "node mounts, or an object store URL (s3://bucket/prefix; credentials from the "
        "environment of the gateway and of every Ray node, e.g. AWS_ACCESS_KEY_ID)",
    )
    _add_key_file(parser, "sign every checkpoint saved and load only checkpoints signed with it")
    parser.add_argument(
        "--max-workers",
        type=_positive_int,
        default=64,
        help="threads serving calls; a waiting sync group step holds one; must exceed "
        "--max-calls-per-token by 8 (kept for health checks) (default: %(default)s)",
    )
    _add_limits(parser)
    parser.add_argument(
        "--grace",
        type=_positive_float,
        default=10.0,
        help="seconds calls in flight get at shutdown (default: %(default)s)",
    )
    ops = parser.add_argument_group("operations", "what the operator sees")
    ops.add_argument(
        "--metrics-port",
        type=_non_negative_int,
        help="serve Prometheus metrics (shardopt_*) at http://HOST:PORT/metrics (0: any free "
        "port, printed as 'metrics on HOST:PORT'; default: none)",
    )
    ops.add_argument(
        "--metrics-host", help="address the metrics server listens on (default: --host)"
    )
    ops.add_argument(
        "--operator-token-file",
        help="operators' bearer tokens, one per line: they may list every tenant's sessions "
        "(shardopt status --all) and nothing else",
    )
    add_log_level(ops, "info")
    parser.set_defaults(handler=_run_serve)


def _add_limits(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`shardopt.gateway.quotas.Limits` and of the operator's shard settings."""
    from shardopt.gateway.quotas import GiB, Limits

    d = Limits()
    limits = parser.add_argument_group(
        "limits and quotas", "what the gateway holds, and what one token (a tenant) may hold"
    )
    for flag, kind, default, text in (
        ("--max-session-gib", _positive_float, d.max_session_bytes / GiB,
         "largest parameter size one session may declare, GiB"),
        ("--max-total-gib", _positive_float, d.max_total_bytes / GiB,
         "parameter bytes of all sessions together, GiB"),
        ("--max-buffered-gib", _positive_float, d.max_buffered_bytes / GiB,
         "bytes all streams in flight may hold together (declared sizes, counted before "
         "anything is allocated), GiB"),
        ("--max-token-gib", _positive_float, d.max_token_bytes / GiB,
         "one token's session parameters plus its streams in flight, GiB"),
        ("--max-transfer-gib", _non_negative_float, d.max_transfer_bytes / GiB,
         "reusable transfer buffers of all sessions together (one per session, of its "
         "parameters' size, for gradients with no shard buffer to land in; beyond this, "
         "transfers allocate per call: slower, never refused), GiB"),
        ("--max-sessions", _positive_int, d.max_sessions, "open sessions in all"),
        ("--max-sessions-per-token", _positive_int, d.max_sessions_per_token,
         "open sessions per token"),
        ("--max-calls-per-token", _positive_int, d.max_calls_per_token,
         "calls (streams and unary calls) one token may have in flight; a sync group of N "
         "workers under one token needs N"),
        ("--stream-idle-timeout", _positive_float, d.stream_idle_timeout_s,
         "seconds a stream may wait for its client's next message before it is cancelled"),
        ("--stream-timeout", _positive_float, d.stream_timeout_s,
         "seconds a stream may wait for its client in all"),
        ("--session-idle-timeout", _non_negative_float, d.session_idle_timeout_s,
         "seconds after which an unused session is closed and its shards released (0: never)"),
    ):  # fmt: skip
        limits.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    shards = parser.add_argument_group(
        "shards", "the operator's choices for every session's shards (clients cannot set them)"
    )
    shards.add_argument(
        "--session-store",
        metavar="NAME",
        help="keep sessions (their records and shard hosts) in the Ray cluster under NAME: a "
        "gateway killed and started again with the same NAME on the same cluster resumes them "
        "for their tokens (default: sessions end with the gateway)",
    )
    shards.add_argument(
        "--max-shards",
        type=_positive_int,
        help="shards one session may have (default: the cluster's GPUs, or its CPUs where it "
        "has no GPU, counted when a session opens)",
    )
    shards.add_argument(
        "--idle-shard-hosts",
        type=_non_negative_int,
        help="idle shard host processes kept for reuse after sessions close; the others end "
        "(default: one per node or GPU)",
    )
    shards.add_argument(
        "--placement",
        choices=("none", "STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"),
        default="none",
        help="Ray placement strategy for shard groups' shards, each reserving "
        "--shard-resources in a placement group (default: %(default)s)",
    )
    shards.add_argument(
        "--shard-resources",
        type=_resources,
        metavar="KEY=N[,KEY=N]",
        help="what each shard of a shard group reserves under --placement (default: CPU=1)",
    )


def _limits_of(args: argparse.Namespace) -> Limits:
    from shardopt.gateway.quotas import GiB, Limits

    return Limits(
        max_session_bytes=int(args.max_session_gib * GiB),
        max_total_bytes=int(args.max_total_gib * GiB),
        max_buffered_bytes=int(args.max_buffered_gib * GiB),
        max_token_bytes=int(args.max_token_gib * GiB),
        max_transfer_bytes=int(args.max_transfer_gib * GiB),
        max_sessions=args.max_sessions,
        max_sessions_per_token=args.max_sessions_per_token,
        max_calls_per_token=args.max_calls_per_token,
        stream_idle_timeout_s=args.stream_idle_timeout,
        stream_timeout_s=args.stream_timeout,
        session_idle_timeout_s=args.session_idle_timeout or None,
        max_shards=args.max_shards,
        idle_shard_hosts=args.idle_shard_hosts,
    )


def _run_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from shardopt.gateway import serve
    from shardopt.gateway.auth import read_tokens, weak_token_reason

    if not args.token_file and not args.no_auth:
        print("shardopt serve: give --token-file, or --no-auth for an unauthenticated server")
        return 2
    embedded = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
    ray_token = os.environ.get("RAY_AUTH_TOKEN")
    refusal = None
    if embedded and os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        refusal = (
            f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: the embedded Ray listens on all "
            "interfaces and must use Ray's token auth (unset RAY_AUTH_MODE, or give "
            "--ray-address)"
        )
    elif ray_token is not None and (reason := weak_token_reason(ray_token)) is not None:
        refusal = f"RAY_AUTH_TOKEN is refused: {reason}"
    try:
        tokens = read_tokens(args.token_file) if args.token_file else None
        operators = read_tokens(args.operator_token_file) if args.operator_token_file else None
    except (OSError, ValueError) as err:
        refusal = refusal or str(err)
    if refusal is not None:
        print(f"shardopt serve: {refusal}")
        return 2
    checkpoint_key = _checkpoint_key(args)
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    try:
        gateway = serve(
            args.host,
            args.port,
            tokens=tokens,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_key=checkpoint_key,
            limits=_limits_of(args),
            max_workers=args.max_workers,
            placement=None if args.placement == "none" else args.placement,
            shard_resources=args.shard_resources,
            operator_tokens=operators,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            session_store=args.session_store,
        )
    except OSError as err:  # the port or the metrics port is not this process's to have
        print(f"shardopt serve: {err}")
        return 1
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if gateway.metrics_port is not None:
        print(f"metrics on {args.metrics_host or args.host}:{gateway.metrics_port}", flush=True)
    print(f"serving on {args.host}:{gateway.port}", flush=True)
    stopping.wait()
    print("shutting down", flush=True)
    gateway.stop(args.grace)
    return 0


# ----- shardopt health ----------------------------------------------------------------------


def _add_health(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "health",
        help="ask a gateway's gRPC health service whether it is serving (for probes)",
        description=(
            "Calls grpc.health.v1.Health/Check on ADDRESS and exits 0 when the answer is "
            "SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout). Needs no token. Meant "
            "for container health checks and readiness probes."
        ),
    )
    parser.add_argument("address", help="the gateway, HOST:PORT")
    parser.add_argument(
        "--service", default="", help="a service name; '' asks about the whole server"
    )
    parser.add_argument("--tls", help="PEM root certificates, for a gateway serving TLS")
    parser.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds (default: %(default)s)"
    )
    parser.set_defaults(handler=_run_health)


def _run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls:
        with open(args.tls, "rb") as f:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.address}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


# ----- the parser ---------------------------------------------------------------------------

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_serve,
    add_status,
    _add_health,
    _add_demo,
    _add_ckpt,
)
"""Each subcommand's ``_add_<name>`` function, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``shardopt`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="shardopt",
        description=(
            "shardopt: torch.optim with the optimizer state and master parameters sharded "
            "over Ray actors. Run 'shardopt COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v for shardopt's info messages, -vv for debug",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``shardopt`` command line.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit code (0 on success).

    Example:
        >>> from shardopt.cli import main
        >>> main(["demo", "--epochs", "1", "--no-progress"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
        logging.getLogger("shardopt").setLevel(level)
    elif getattr(args, "log_level", None):
        logging.getLogger("shardopt").setLevel(args.log_level.upper())
    return args.handler(args)
