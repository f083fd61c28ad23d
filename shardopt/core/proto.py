"""The generated protobuf and gRPC modules of ``shardopt.v1``, generated first if missing.

An installed shardopt has them (``setup.py`` generates them at build time); a source checkout
that was never built gets them generated here, once, with grpcio-tools.

Talks to: :mod:`shardopt._protoc` (only when the code is missing).
"""

from __future__ import annotations

import importlib
import pathlib

try:
    from shardopt.v1 import optimizer_pb2, optimizer_pb2_grpc, tensor_pb2
except ImportError:  # a source checkout: generate next to this file
    from shardopt import _protoc

    _root = pathlib.Path(__file__).resolve().parents[2]  # holds protos/ and shardopt/
    _protoc.generate(_root / "protos", _root)
    importlib.invalidate_caches()
    from shardopt.v1 import optimizer_pb2, optimizer_pb2_grpc, tensor_pb2

pb = optimizer_pb2
"""Messages of ``shardopt/v1/optimizer.proto``."""
tensors_pb = tensor_pb2
"""Messages of ``shardopt/v1/tensor.proto``."""
rpc = optimizer_pb2_grpc
"""The service's stub and servicer base."""
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OptimizerService"].full_name

__all__ = ["SERVICE_NAME", "pb", "rpc", "tensors_pb"]
