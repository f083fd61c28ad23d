"""The package's shape: layers that import only downwards, no import cycles, small modules.

Every import counts, at module level or inside a function, under ``TYPE_CHECKING`` or not: a
cycle hidden by a deferred import is still a cycle. Read from the source with ``ast``; nothing is
imported.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "shardopt"
GENERATED = PACKAGE / "v1"
LAYERS = ["core", "checkpoint", "actor", "client", "gateway", "top"]
"""Lowest first: a module may import its own layer and the ones below it."""
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if GENERATED not in p.parents}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The shardopt modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | {"shardopt.v1"}
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_import_cycles(graph):
    """Depth-first search over every import; reports the first cycle it finds."""
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_layers_import_only_downwards(graph):
    wrong = []
    for module, imported in graph.items():
        if module == "shardopt":  # the public surface re-exports from every layer
            continue
        mine = LAYERS.index(_layer(module))
        for target in imported:
            if target.startswith("shardopt.v1") or target == "shardopt._protoc":
                continue
            if LAYERS.index(_layer(target)) > mine:
                wrong.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_core_and_checkpoint_are_ray_free():
    for path in list((PACKAGE / "core").rglob("*.py")) + list(
        (PACKAGE / "checkpoint").rglob("*.py")
    ):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path


def test_modules_stay_small():
    big = {
        _module_name(p): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"split these (over {MAX_LINES} lines): {big}"


def test_every_module_says_what_it_talks_to():
    """Module docstrings end with who the module talks to (STYLE.md), packages say what they
    hold."""
    missing = []
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not doc:
            missing.append(f"{name}: no docstring")
        elif path.name != "__init__.py" and name not in ("shardopt", "shardopt.__main__"):
            if "Talks to" not in doc:
                missing.append(f"{name}: no 'Talks to'")
    assert not missing, "\n".join(missing)


def test_a_shard_hosts_imports_stay_lean():
    """A shard host's process imports what the actor side needs, nothing more: not the client's
    modules (through the package's public names) nor torch's DCP (until a shard's first
    checkpoint). Each adds to the start of every actor (about 0.6 s and 1.1 s here)."""
    code = (
        "import sys\n"
        "import shardopt.actor.host, shardopt.actor.shard_group_host\n"
        "print(sorted(m for m in sys.modules if m.startswith(('shardopt.client', "
        "'shardopt.gateway', 'shardopt.checkpoint.', 'torch.distributed.checkpoint', "
        "'torch._dynamo'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "[]"
    import shardopt  # the public names still come from where they live

    assert shardopt.AdamW.__module__ == "shardopt.client.algorithms"
    assert {"AdamW", "ShardedOptimizer", "close_group"} <= set(dir(shardopt))
    assert set(shardopt.__all__) == {*shardopt._HOME, "__version__"}  # the lists agree
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shardopt.nope  # noqa: B018
