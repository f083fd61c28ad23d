"""How a shard's tensors travel between this process and the shard: the transport, per shard.

- ``shared_memory``: a CPU shard on this node maps its buffers here (:mod:`shardopt.core.shm`).
- ``object_store``: one flat numpy buffer each way through Ray's object store (any shard, any
  device: CUDA tensors are copied to and from the host on each side). The fallback.
- ``cuda_ipc``, ``nixl`` (or a one-sided transport registered with
  ``ray.experimental.register_tensor_transport``, used as asked): Ray Direct Transport (RDT).
  The client puts its gradient buffer with ``ray.put(..., _tensor_transport=...)``, the
  shard's ``step_direct`` receives it as a tensor on its device and answers with its
  parameters the same way: GPU to GPU, never through the host. These are RDT's one-sided
  transports, the only ones a ``ray.put`` and a ``ray.get`` by the client may use. CUDA IPC
  needs a client that is itself a Ray actor holding a GPU (Ray gives drivers no GPU ids) and
  shards on that same GPU (fractional ``num_gpus``), on its node; NIXL needs the ``nixl``
  package on both sides. Shard hosts for RDT are made with Ray's ``enable_tensor_transport``.

RDT's two-sided transports (``gloo``, ``nccl``) are refused with the reason: Ray moves their
objects only from one actor task's return value into another actor task's argument
(``ray.put`` and ``ray.get`` refuse them), while the proxy's gradients are made by the user's
code in this process and its parameters are read back here. RDT's other limits, and how this
design keeps to them: an RDT object must not change once sent (the client's gradient ref is
dropped before its buffer is written again; the shard sends a copy of its parameters); a shard
host is a plain sequential actor (no async or threaded actor; GPU shards have no step lanes;
Ray runs the calls of a host made for RDT on a background thread, one at a time);
a step whose direct call fails switches that shard to the object store for good.

Talks to: Ray (the runtime context: node, actor, GPUs); nothing else. The backend
(:mod:`shardopt.client.local`) sends the steps.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

TRANSPORTS = ("auto", "object_store", "cuda_ipc", "nixl")
"""What ``ShardedOptimizer(transport=...)`` accepts."""

TWO_SIDED = ("gloo", "nccl")


def check_transport(transport: str, group: str | None = None, address: str | None = None) -> str:
    """``transport`` if the optimizer accepts it (with ``group`` and ``address`` as given).

    Raises:
        ValueError: an unknown transport, a two-sided RDT transport (with the reason), or a
            transport chosen for a shard group or a gateway (they choose their own).
    """
    if transport in TWO_SIDED:
        raise ValueError(
            f"transport={transport!r}: RDT's two-sided transports move tensors only from one "
            "actor task's return value into another actor task's argument (ray.put and ray.get "
            "refuse them), and the proxy's gradients are made in this process: use 'cuda_ipc' "
            "(a GPU client actor and its shards on one GPU), 'nixl', or 'object_store'"
        )
    if transport not in TRANSPORTS and not custom_one_sided(transport):
        raise ValueError(
            f"Invalid transport: {transport!r} (one of {', '.join(TRANSPORTS)}, or a one-sided "
            "transport registered with ray.experimental.register_tensor_transport)"
        )
    if transport != "auto" and (group is not None or address is not None):
        raise ValueError(
            "transport applies to an optimizer's own shards: shard groups and gateways choose "
            "their own (shared memory or the object store; gRPC)"
        )
    return transport


def custom_one_sided(transport: str) -> bool:
    """Whether ``transport`` names a one-sided RDT transport registered with Ray in this process
    (``ray.experimental.register_tensor_transport``), other than the built-in ones."""
    if transport.lower() in TRANSPORTS or transport.lower() in TWO_SIDED:
        return False
    try:
        from ray.experimental.rdt.util import (
            is_one_sided_transport,
            normalize_and_validate_tensor_transport,
        )

        return is_one_sided_transport(normalize_and_validate_tensor_transport(transport))
    except (ImportError, ValueError, KeyError):
        return False


def is_direct(transport: str | None) -> bool:
    """Whether a shard's transport is a Ray Direct Transport."""
    return transport is not None and transport not in ("shared_memory", "object_store", "auto")


def needs_rdt_hosts(requested: str, actor_options: dict[str, Any], client: ClientSide) -> bool:
    """Whether the shard hosts must be made with Ray's ``enable_tensor_transport`` (which runs
    their calls on a background thread): a direct transport asked for by name, or ``auto``
    with GPU shards and a client that is an actor holding a GPU (CUDA IPC)."""
    if requested == "auto":
        return bool(actor_options.get("num_gpus")) and client.in_actor and bool(client.gpu_ids)
    return is_direct(requested)


@dataclass(frozen=True)
class ClientSide:
    """What the transports need to know about this process."""

    node_id: str | None
    in_actor: bool
    gpu_ids: tuple[str, ...]
    nixl: bool

    @classmethod
    def here(cls) -> ClientSide:
        import ray

        context = ray.get_runtime_context()
        in_actor = context.get_actor_id() is not None
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids()) if in_actor else ()
        nixl = importlib.util.find_spec("nixl") is not None
        return cls(context.get_node_id(), in_actor, gpu_ids, nixl)


def choose(
    requested: str,
    client: ClientSide,
    host: dict[str, Any],
    devices: set[torch.device],
    shared: bool,
) -> tuple[str, str]:
    """The transport of one shard, and why (for the log when a request could not be met).

    Args:
        requested: the optimizer's ``transport``.
        client: this process.
        host: the shard host's ``info()`` (device, node, GPUs, NIXL).
        devices: the devices of this process's tensors the shard holds.
        shared: whether the shard's buffers are in shared memory with this process.
    """
    if shared:
        return "shared_memory", ""
    on_cuda = host["device"].startswith("cuda")
    client_cuda = bool(devices) and all(d.type == "cuda" for d in devices) and len(devices) == 1
    if requested in ("auto", "cuda_ipc"):
        why = ""
        if not (on_cuda and client_cuda):
            why = "the shard and this process's tensors of it are not all on CUDA"
        elif not client.in_actor or not client.gpu_ids:
            why = "this process is not a Ray actor holding a GPU (Ray gives drivers no GPU ids)"
        elif host["node_id"] != client.node_id:
            why = "the shard is on another node"
        elif not set(host.get("gpu_ids", ())) & set(client.gpu_ids):
            why = "the shard is not on this process's GPU (give both fractional num_gpus)"
        if not why:
            return "cuda_ipc", ""
        return "object_store", why if requested == "cuda_ipc" else ""
    if requested == "nixl":
        if client.nixl and host.get("nixl"):
            return "nixl", ""
        return "object_store", "the nixl package is missing here or on the shard's host"
    if is_direct(requested):  # a transport registered with Ray: used as asked
        return requested.lower(), ""
    return "object_store", ""


def await_registration(hosts: list[Any], transports: list[str]) -> None:
    """Registers a transport the user registered with Ray (not one of Ray's own) on the hosts
    of the shards that use it, and waits until they have it. Ray does so only for actors made
    after the registration, with a task of their own that a first step could overtake; a
    pooled host may be older. (Registering again is a no-op on a host that has it.)"""
    custom = [
        h for h, t in zip(hosts, transports) if is_direct(t) and t not in ("cuda_ipc", "nixl")
    ]
    if not custom:
        return
    import ray

    manager = getattr(ray._private.worker.global_worker, "rdt_manager", None)
    for host in custom if manager is not None else ():
        manager.register_custom_transports_on_actor(host)
        manager.wait_until_custom_transports_registered(host)


def choose_all(
    requested: str,
    client: ClientSide,
    infos: list[dict[str, Any]],
    devices: list[set[torch.device]],
    shared: list[bool],
) -> list[str]:
    """:func:`choose` for every shard, warning where an explicit request fell back."""
    chosen = []
    for s, info in enumerate(infos):
        transport, why = choose(requested, client, info, devices[s], shared[s])
        if why:
            logger.warning("shard %d: no %r (%s): object store", s, requested, why)
        chosen.append(transport)
    return chosen
