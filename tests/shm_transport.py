"""A one-sided Ray Direct Transport for CPU tensors through files in ``/dev/shm``, so that the
tests can drive shardopt's RDT data path (``ray.put(..., _tensor_transport=...)`` by the client,
an actor method answering through the transport, ``ray.get`` fetching it) without a GPU.

A real transport, registered with Ray as any custom one is
(``ray.experimental.register_tensor_transport``): the sender writes the tensors' bytes into a
file when Ray extracts the object's metadata, every receiver reads them from it, and Ray's
reference counting removes the file (``garbage_collect``). Shard hosts find it in this module
(the tests' folder is on every worker's ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from ray.experimental.rdt.tensor_transport_manager import (
    CommunicatorMetadata,
    TensorTransportManager,
    TensorTransportMetadata,
)

NAME = "SHM_TEST"
DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass
class ShmMetadata(TensorTransportMetadata):
    path: str | None = None
    offsets: list[int] = field(default_factory=list)


@dataclass
class ShmCommunicatorMetadata(CommunicatorMetadata):
    pass


class SharedMemoryFileTransport(TensorTransportManager):
    @property
    def tensor_transport_backend(self) -> str:
        return NAME

    @staticmethod
    def is_one_sided() -> bool:
        return True

    @staticmethod
    def can_abort_transport() -> bool:
        return False

    def actor_has_tensor_transport(self, actor: Any) -> bool:
        return True

    def extract_tensor_transport_metadata(self, obj_id: str, rdt_object: list) -> ShmMetadata:
        path = os.path.join(DIRECTORY, f"shardopt-rdt-test-{obj_id}")
        offsets, at = [], 0
        with open(path, "wb") as f:
            for t in rdt_object:
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                offsets.append(at)
                f.write(data.tobytes())
                at += data.nbytes
        meta = [(tuple(t.shape), t.dtype) for t in rdt_object]
        return ShmMetadata(tensor_meta=meta, tensor_device="cpu", path=path, offsets=offsets)

    def get_communicator_metadata(self, src_actor, dst_actor, backend=None):
        return ShmCommunicatorMetadata()

    def recv_multiple_tensors(self, obj_id, tensor_transport_metadata, communicator_metadata,
                              target_buffers=None):  # fmt: skip
        meta = tensor_transport_metadata
        with open(meta.path, "rb") as f:
            data = bytearray(f.read())
        tensors = []
        for (shape, dtype), start in zip(meta.tensor_meta, meta.offsets):
            n = torch.Size(shape).numel() * dtype.itemsize
            raw = torch.frombuffer(data, dtype=torch.uint8, count=n, offset=start) if n else None
            tensor = torch.empty(shape, dtype=dtype)
            if raw is not None:
                tensor.reshape(-1).view(torch.uint8).copy_(raw)
            tensors.append(tensor)
        return tensors

    def send_multiple_tensors(self, tensors, tensor_transport_metadata, communicator_metadata):
        raise NotImplementedError("a one-sided transport: receivers read the file")

    def garbage_collect(self, obj_id, tensor_transport_meta, tensors):
        try:
            os.unlink(tensor_transport_meta.path)
        except (OSError, TypeError):
            pass

    def abort_transport(self, obj_id, communicator_metadata):
        pass


def register() -> None:
    """Registers the transport in this process (once; before the actors that use it)."""
    from ray.experimental import register_tensor_transport
    from ray.experimental.rdt.util import transport_manager_info

    if NAME not in transport_manager_info:
        register_tensor_transport(NAME, ["cpu"], SharedMemoryFileTransport, torch.Tensor)
