"""What ``shardopt status`` shows: optimizers, shard groups and gateway sessions with their shards.

Two views, each a plain dict (JSON as it is) with a list of rows per kind:

- :func:`cluster_status`, from inside the Ray cluster (``RAY_ADDRESS``): the shard groups of
  the registry (``shardopt-groups``) with each group shard host's status and version, and every
  optimizer whose shards live on the named shard hosts of the ``shardopt`` namespace
  (``host/...`` and ``replica/...``, see :func:`shardopt.client.runtime.host_name`), by owner
  (the process and optimizer that created them) with each shard's replica. What it cannot see:
  which gateway session or tenant an optimizer serves (a gateway's optimizers show as those of
  the gateway's process: ask the gateway), and hosts started by shardopt versions that did not
  name them.
- :func:`gateway_status`, from anywhere, over gRPC: the sessions a token may see
  (``ListSessions``: its own; every tenant's for an operator's token).

A shard row holds: ``shard``, ``node`` (Ray node id), ``device``, ``params``, ``bytes``,
``last_step`` (-1 before the first), ``with_state`` (parameters with optimizer state) and, for
in-cluster optimizers, ``replica`` (the replica's node, or None).

Talks to: Ray (named actors: the registry, group shard hosts, shard hosts), or a gateway over
gRPC.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from shardopt.actor.host import NAMESPACE
from shardopt.actor.shard_group_registry import REGISTRY_NAME

CALL_TIMEOUT_S = 10.0
"""How long one actor may take to answer before its row says it did not."""


def _get(refs: Any) -> Any:
    return ray.get(refs, timeout=CALL_TIMEOUT_S)


def _shard_row(status: Any, node: str | None, device: str | None = None) -> dict[str, Any]:
    return {
        "shard": status.shard_index,
        "node": node,
        "device": device or status.device,
        "params": status.num_params,
        "bytes": status.param_bytes,
        "last_step": status.last_step_id,
        "with_state": len(status.state_ids),
    }


# ----- in the cluster -------------------------------------------------------------------------


def _groups() -> list[dict[str, Any]]:
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:  # no group was ever made in this cluster
        return []
    rows = []
    for name, group in sorted(_get(registry.groups.remote()).items()):
        row = {
            "group": name,
            "world_size": group["world_size"],
            "mode": group["mode"],
            "members": group["members"],
            "owner_rank": group["owner_rank"],
            "owner_closed": group["owner_closed"],
            "shards": [],
        }
        try:
            hosts, keys = _get(registry.primary_hosts.remote(name))
            statuses = _get([h.status.remote(k) for h, k in zip(hosts, keys)])
            versions = _get([h.version.remote() for h in hosts])
            for status, node, version in zip(statuses, group["node_ids"], versions):
                row["shards"].append({**_shard_row(status, node), "version": version})
        except Exception as err:  # torn down meanwhile, or a host lost
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


def _optimizers() -> tuple[list[dict[str, Any]], list[str]]:
    """Every optimizer with shards on the named hosts, and the hosts that did not answer."""
    named = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(("host/", "replica/"))
    ]
    hosts = {}
    for name in named:
        try:
            hosts[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # gone meanwhile
            continue
    infos = {n: h.info.remote() for n, h in hosts.items()}
    shards = {n: h.describe.remote() for n, h in hosts.items()}
    optimizers: dict[str, dict[str, Any]] = {}
    replicas: dict[str, str | None] = {}
    unreachable = []
    for name in sorted(hosts):
        try:
            info, described = _get([infos[name], shards[name]])
        except Exception as err:
            unreachable.append(f"{name}: {type(err).__name__}")
            continue
        for entry in described:
            owner, _, rest = entry["key"].partition("/")
            index, _, replica = rest.partition("/")
            if replica:  # "<owner>/<shard>/replica<n>"
                replicas[f"{owner}/{index}"] = info["node_id"]
                continue
            row = optimizers.setdefault(
                owner, {"owner": owner, "optimizer": entry["optimizer"], "shards": []}
            )
            row["shards"].append(_shard_row(entry["status"], info["node_id"], info["device"]))
    for owner, row in optimizers.items():
        row["shards"].sort(key=lambda shard: shard["shard"])
        for shard in row["shards"]:
            shard["replica"] = replicas.get(f"{owner}/{shard['shard']}")
    return [optimizers[k] for k in sorted(optimizers)], unreachable


def cluster_status() -> dict[str, Any]:
    """The cluster's shard groups and optimizers with their shards (see the module docstring).

    Joins the cluster in reach first (``RAY_ADDRESS``), as the proxy does.
    """
    from shardopt.client.runtime import ensure_ray

    ensure_ray()
    optimizers, unreachable = _optimizers()
    return {
        "where": os.environ.get("RAY_ADDRESS") or "local Ray",
        "time": time.time(),
        "groups": _groups(),
        "optimizers": optimizers,
        "unreachable_hosts": unreachable,
    }


# ----- through a gateway ----------------------------------------------------------------------


def gateway_status(
    address: str,
    token: str | None,
    tls: bool | str | os.PathLike | None = None,
    all_tenants: bool = False,
    timeout_s: float = CALL_TIMEOUT_S,
) -> dict[str, Any]:
    """The sessions (with their shards) a token may see on the gateway at ``address``.

    Raises:
        PermissionError, ShardoptError, ...: what the gateway answered (an unknown token, a
            tenant asking for every tenant's sessions).
    """
    import grpc

    from shardopt.client.gateway_session import open_channel, raised
    from shardopt.core.proto import pb, rpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with open_channel(address, tls) as channel:
        try:
            reply = rpc.OptimizerServiceStub(channel).ListSessions(
                pb.ListSessionsRequest(all_tenants=all_tenants),
                metadata=metadata,
                timeout=timeout_s,
            )
        except grpc.RpcError as err:
            raise raised(err) from None
    sessions = []
    for s in reply.sessions:
        sessions.append(
            {
                "session": s.session_id,
                "scope": s.scope,
                "optimizer": s.optimizer,
                "params": s.num_params,
                "bytes": s.param_bytes,
                "steps": s.steps,
                "age_s": round(s.age_seconds, 1),
                "idle_s": round(s.idle_seconds, 1),
                "group": s.group or None,
                "rank": s.rank if s.group else None,
                "error": s.shards_error or None,
                "shards": [
                    {
                        "shard": shard.shard,
                        "node": shard.node_id or None,
                        "device": shard.device,
                        "params": shard.num_params,
                        "bytes": shard.param_bytes,
                        "last_step": shard.last_step,
                        "with_state": shard.params_with_state,
                    }
                    for shard in s.shards
                ],
            }
        )
    return {"where": address, "time": time.time(), "sessions": sessions}
