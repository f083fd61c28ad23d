"""Build hook: generate shardopt/v1 (gRPC and protobuf code) from protos/ before packaging.

Everything else about the package is in pyproject.toml.
"""

import importlib.util
import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent


def _generate_protos() -> None:
    spec = importlib.util.spec_from_file_location("_shardopt_protoc", ROOT / "shardopt/_protoc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(ROOT / "protos", ROOT)


_generate_protos()
setup()
