"""The core's folders: each is one idea, and the dependencies between them point one way.

``densepure_core`` is pure library code: it imports no Prefect, Ray, DuckDB or the pipeline
(``tasks``, ``flows``). Between its parts, :data:`ALLOWED` is the whole dependency graph; a new
import across folders is a design decision that changes this table (and the map in
docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "densepure_core"

#: part -> the parts it may import (a part is a subpackage or a top-level module).
ALLOWED = {
    "rng": set(),
    "remote": set(),
    "certification": set(),
    "diffusion": set(),
    "config": {"certification", "rng"},
    "data": {"config", "remote"},
    "models": {"data", "remote"},
    "smoothing": {"diffusion", "certification", "rng", "models"},
    "attack": {"diffusion", "smoothing", "rng"},
    "addt": {"rng"},
}
FORBIDDEN_PACKAGES = ("prefect", "ray", "duckdb", "tasks", "flows", "s3fs")


def _part(path: Path) -> str:
    rel = path.relative_to(CORE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    """Absolute module names ``path`` imports anywhere (relative imports resolved)."""
    package = ["densepure_core", *path.relative_to(CORE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append(module)
            if node.module is None or node.level == 0 and module == "densepure_core":
                found += [f"{module}.{a.name}" for a in node.names]
    return found


def _core_modules():
    return [p for p in CORE.rglob("*.py")]


def test_every_part_is_declared():
    parts = {_part(p) for p in _core_modules() if p.name != "__init__.py" or p.parent != CORE}
    assert parts == set(ALLOWED), f"undeclared parts: {parts - set(ALLOWED)}; stale: {set(ALLOWED) - parts}"


def test_parts_import_only_what_they_may():
    bad = []
    for path in _core_modules():
        if path.parent == CORE and path.name == "__init__.py":
            continue
        part = _part(path)
        for name in _imports(path):
            pieces = name.split(".")
            if pieces[0] != "densepure_core" or len(pieces) < 2:
                continue
            other = pieces[1]
            if other != part and other not in ALLOWED[part]:
                bad.append(f"{path.relative_to(CORE)} imports {name} ({part} -> {other})")
    assert not bad, "\n".join(bad)


def test_the_allowed_graph_has_no_cycle():
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for dep in ALLOWED[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert not [p for p in ALLOWED if p in reachable(p)]


def test_the_core_imports_no_pipeline_or_service_package():
    bad = [f"{p.relative_to(CORE)}: {name}" for p in _core_modules() for name in _imports(p)
           if name.split(".")[0] in FORBIDDEN_PACKAGES]
    assert not bad, bad


def test_the_import_parser_resolves_relative_imports(tmp_path):
    pkg = CORE / "smoothing" / "executor.py"
    names = _imports(pkg)
    assert "densepure_core.smoothing.options" in names and "densepure_core.diffusion.purify" in names
