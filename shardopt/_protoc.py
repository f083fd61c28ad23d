"""Generates the Python code of ``protos/shardopt/v1/*.proto`` into ``shardopt/v1/``.

Run by ``setup.py`` when the package is built or installed (with the grpcio-tools pinned in
``pyproject.toml``'s build requirements), and by :mod:`shardopt.core.proto` when a source checkout
was never built. The generated files are not committed and hold no logic.

Talks to: grpcio-tools' protoc. Imports nothing of shardopt (setup.py loads it by path).
"""

from __future__ import annotations

import pathlib

PACKAGE = ("shardopt", "v1")


def generate(proto_root: pathlib.Path, out_root: pathlib.Path) -> pathlib.Path:
    """Compiles every ``.proto`` under ``proto_root/shardopt/v1`` into ``out_root/shardopt/v1``.

    Returns:
        The directory of the generated package.

    Raises:
        RuntimeError: protoc failed.
    """
    import grpc_tools
    from grpc_tools import protoc

    source_dir = proto_root.joinpath(*PACKAGE)
    protos = sorted(str(p) for p in source_dir.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {source_dir}")
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    package = out_root.joinpath(*PACKAGE)
    (package / "__init__.py").write_text(
        '"""Generated from protos/shardopt/v1 at build time. Do not edit."""\n'
    )
    return package
