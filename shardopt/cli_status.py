"""``shardopt status``: a table of optimizers, shard groups and gateway sessions with their shards.

Two sources (:mod:`shardopt.client.status`): a gateway over gRPC (``--address HOST:PORT``
with ``--token-file``: the token's own sessions; ``--all`` with an operator's token: every
tenant's), or the Ray cluster itself (``RAY_ADDRESS`` or ``--ray-address``: shard groups and
the optimizers on shardopt's shard hosts). ``--watch`` redraws every few seconds; ``--json``
prints the rows as JSON instead.

Talks to: :mod:`shardopt.client.status` (Ray or a gateway); the terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    """``--log-level``: the level of shardopt's loggers (lifecycle events are ``info``)."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default,
        help="shardopt's log level; lifecycle events (event=... lines) are info, losses and "
        "timeouts warning (default: %(default)s)",
    )


def add_status(subparsers: Any) -> None:
    """Adds ``shardopt status`` to the command line's subparsers."""
    parser = subparsers.add_parser(
        "status",
        help="show optimizers, shard groups and gateway sessions with their shards",
        description=(
            "Shows a table of shard groups and optimizers (from inside the Ray cluster: "
            "RAY_ADDRESS or --ray-address), or of a gateway's sessions (--address HOST:PORT "
            "--token-file F: the token's own sessions; --all with an operator's token from "
            "shardopt serve --operator-token-file: every tenant's), each with its shards: "
            "node, device, parameters, bytes, last step, replica. A gateway's sessions show in "
            "the cluster view only as optimizers of the gateway's process."
        ),
    )
    parser.add_argument("--address", help="a gateway, HOST:PORT (default: the Ray cluster)")
    parser.add_argument("--token-file", help="the bearer token (its first token) for --address")
    parser.add_argument("--tls", help="PEM root certificates, for a gateway serving TLS")
    parser.add_argument(
        "--all", action="store_true", help="every tenant's sessions (an operator's token)"
    )
    parser.add_argument("--ray-address", help="the Ray cluster to look at (default: RAY_ADDRESS)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    parser.add_argument(
        "--count", type=int, help="with --watch: stop after this many refreshes (>= 1)"
    )
    add_log_level(parser, "warning")
    parser.set_defaults(handler=run_status)


# ----- tables -----------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _node(node: str | None) -> str:
    return node[:12] if node else "-"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell."""
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _shard_cells(shard: dict[str, Any]) -> list[Any]:
    return [
        shard["shard"],
        _node(shard["node"]),
        shard["device"],
        shard["params"],
        _size(shard["bytes"]),
        shard["last_step"],
        shard["with_state"],
    ]


SHARD_HEADERS = ["SHARD", "NODE", "DEVICE", "PARAMS", "BYTES", "LAST STEP", "STATE"]


def format_cluster(status: dict[str, Any]) -> str:
    """The in-cluster view as text."""
    lines = [f"shardopt status: Ray cluster ({status['where']})", ""]
    groups = status["groups"]
    lines.append(f"shard groups: {len(groups)}")
    rows = []
    for g in groups:
        head = [g["group"], g["mode"], g["world_size"], ",".join(map(str, g["members"])) or "-"]
        if not g["shards"]:
            rows.append(head + [g.get("error", "no shards")] + [None] * 7)
        for i, shard in enumerate(g["shards"]):
            rows.append((head if i == 0 else [""] * 4) + _shard_cells(shard) + [shard["version"]])
    if rows:
        lines.append(table(["GROUP", "MODE", "WORLD", "MEMBERS", *SHARD_HEADERS, "VERSION"], rows))
    lines += ["", f"optimizers: {len(status['optimizers'])}"]
    rows = []
    for o in status["optimizers"]:
        for i, shard in enumerate(o["shards"]):
            head = [o["owner"], o["optimizer"]] if i == 0 else ["", ""]
            rows.append(head + _shard_cells(shard) + [_node(shard["replica"])])
    if rows:
        lines.append(table(["OWNER", "OPTIMIZER", *SHARD_HEADERS, "REPLICA"], rows))
    for host in status.get("unreachable_hosts", []):
        lines.append(f"unreachable shard host: {host}")
    return "\n".join(lines)


def format_gateway(status: dict[str, Any]) -> str:
    """The gateway view as text."""
    sessions = status["sessions"]
    lines = [f"shardopt status: gateway {status['where']}", "", f"sessions: {len(sessions)}"]
    rows = []
    for s in sessions:
        group = f"{s['group']}[{s['rank']}]" if s["group"] else "-"
        head = [s["session"][:12], s["scope"], s["optimizer"], s["steps"], s["idle_s"], group]
        if not s["shards"]:
            rows.append(head + [s["error"] or "no shards"] + [None] * 6)
        for i, shard in enumerate(s["shards"]):
            rows.append((head if i == 0 else [""] * 6) + _shard_cells(shard))
    if rows:
        headers = ["SESSION", "SCOPE", "OPTIMIZER", "STEPS", "IDLE S", "GROUP", *SHARD_HEADERS]
        lines.append(table(headers, rows))
    return "\n".join(lines)


# ----- the command ------------------------------------------------------------------------------


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.strip().startswith("#"):
                return line.strip()
    raise SystemExit(f"shardopt status: {path} holds no token")


def run_status(args: argparse.Namespace) -> int:
    from shardopt.client import status as source

    if (args.watch is not None and args.watch <= 0) or (args.count is not None and args.count < 1):
        print("shardopt status: --watch takes seconds > 0, --count a number >= 1")
        return 2
    if args.address is None and not (args.ray_address or os.environ.get("RAY_ADDRESS")):
        print(
            "shardopt status: give --address HOST:PORT (a gateway) or RAY_ADDRESS / "
            "--ray-address (a Ray cluster)"
        )
        return 2
    if args.address is None and args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    token = _token(args.token_file)
    count = 0
    while True:
        try:
            if args.address is not None:
                status = source.gateway_status(args.address, token, args.tls, args.all)
                text = format_gateway(status)
            else:
                status = source.cluster_status()
                text = format_cluster(status)
        except Exception as err:  # the gateway's answer, or the cluster's: said, not raised
            print(f"shardopt status: {type(err).__name__}: {err}")
            return 1
        if args.watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # clear the screen, cursor home
        print(json.dumps(status) if args.json else text, flush=True)
        count += 1
        if not args.watch or (args.count is not None and count >= args.count):
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        if not args.json:
            print(flush=True)
