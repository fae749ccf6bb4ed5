"""The house keeps its shape: small modules that say their job, a pure core, and imports
that run one way (core, then edges, then the daemon, then the commands).

Read from the source with ``ast``; nothing is imported or run.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gateway"
MAX_LINES = 440
"""About 400: one job a module."""

PURE = (
    "gateway.channels",
    "gateway.spool.records",
    "gateway.relay.policy",
    "gateway.relay.breaker",
    "gateway.retention.due",
    "gateway.crypto.sealed.errors",
    "gateway.crypto.sealed.format",
    "gateway.crypto.sealed.keyformat",
)
"""The pure core: decisions and formats, time passed in, no I/O of their own."""
IMPURE = {"asyncio", "aiohttp", "sqlite3", "os", "shutil", "pathlib", "io", "tempfile", "socket"}

LAYERS = (
    (
        "core",
        ("gateway", "gateway.errors", "gateway.japan", "gateway.config", "gateway.shipped", *PURE),
    ),
    (
        "edges",
        (
            "gateway.fsutil",
            "gateway.pgutil",
            "gateway.crypto",
            "gateway.identity",
            "gateway.spool",
            "gateway.relay",
            "gateway.retention",
            "gateway.ingress",
            "gateway.ops",
        ),
    ),
    (
        "daemon",
        (
            "gateway.preflight",
            "gateway.backends",
            "gateway.reload",
            "gateway.parts",
            "gateway.daemon",
        ),
    ),
    ("commands", ("gateway.signals", "gateway.cli", "gateway.demo", "gateway.testing")),
)
"""Each module belongs to the layer of its longest matching prefix; it may import its
own layer and the layers above it in this list, never one below."""


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text("utf-8"))


def imported(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), at any depth."""
    names = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_label, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package (its version) matches itself only
            below = prefix != "gateway" and name.startswith(prefix + ".")
            matches = name == prefix or below
            if matches and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


MODULES = modules()


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[n for n, _ in MODULES])
def test_each_module_states_its_job_in_a_docstring(name: str, path: Path) -> None:
    docstring = ast.get_docstring(tree(path))
    assert docstring and len(docstring.split()) >= 3, f"{name} has no docstring saying its job"


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[n for n, _ in MODULES])
def test_no_module_is_over_about_400_lines(name: str, path: Path) -> None:
    lines = len(path.read_text("utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by job"


@pytest.mark.parametrize(
    ("name", "path"), [(n, p) for n, p in MODULES if n.startswith(PURE)], ids=lambda v: str(v)
)
def test_the_pure_core_does_no_io(name: str, path: Path) -> None:
    """Nothing under channels/, spool/records, relay/policy, retention/due (and the sealed
    payload's formats) imports asyncio, aiohttp, sqlite3 or the file system, or opens a
    file."""
    roots = {n.split(".")[0] for n in imported(path, name)}
    assert not roots & IMPURE, f"{name} imports {sorted(roots & IMPURE)}"
    calls = {
        node.func.id
        for node in ast.walk(tree(path))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "open" not in calls, f"{name} opens a file"


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[n for n, _ in MODULES])
def test_imports_run_one_way(name: str, path: Path) -> None:
    """Core, then edges, then the daemon, then the commands: never back up the list."""
    own = layer_of(name)
    assert own is not None, f"{name} is in no layer: add it to LAYERS"
    backwards = sorted(
        other
        for other in imported(path, name)
        if other.startswith("gateway.") and (layer_of(other) or 0) > own
    )
    label = LAYERS[own][0]
    assert not backwards, f"{name} ({label}) imports from a later layer: {backwards}"


def test_every_layer_and_pure_module_exists() -> None:
    """The lists above name modules that are there (a rename must update them)."""
    names = {n for n, _ in MODULES}
    for _label, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix
