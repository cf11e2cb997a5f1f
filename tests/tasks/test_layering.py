"""The stage layer's structure: imports point one way, and messages name real commands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import typer

TASKS = Path(__file__).resolve().parents[2] / "tasks"


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (type-only imports are no dependency)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(path: Path) -> set[str]:
    """The tasks modules ``path`` imports anywhere (top level or inside functions), as dotted
    names below ``tasks`` (``certify.vote``); ``from tasks.x import y`` counts as ``x.y`` too,
    since ``y`` may be a module."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("tasks.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tasks" or node.module.startswith("tasks."):
                module = node.module.partition(".")[2]
                if module:
                    found.add(module)
                found |= {f"{module}.{a.name}" if module else a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the tasks layer imports absolutely")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(TASKS).with_suffix("").parts): p for p in TASKS.rglob("*.py")
               if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_import_parser_sees_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from tasks.common import storage, faults\nfrom tasks.common.layout import X\n"
                   "import tasks.certify.plan\ndef f():\n    from tasks.query import connect\n"
                   "    from tasks.certify import report\n")
    assert {"common.storage", "common.faults", "common.layout", "certify.plan", "query",
            "certify.report"} <= _imports(src)


def test_tasks_imports_have_no_cycle():
    graph = _graph()
    assert {"common.layout", "common.sqlfuncs", "query", "common.textfmt", "certify.aggregate",
            "certify.aggregate_sql", "certify.aggregate_checks", "certify.vote", "certify.report"} <= set(graph)
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_leaves_import_nothing_above_them():
    graph = _graph()
    assert graph["common.textfmt"] == set() and graph["common.sqlfuncs"] == set()
    assert graph["certify.aggregate_sql"] == set() and graph["attack.summary_sql"] == set()
    assert graph["common.layout"] <= {"common.storage", "common.faults"}


def test_vote_stage_does_not_import_the_aggregate_stage():
    graph = _graph()
    assert not {"certify.aggregate", "certify.aggregate_sql", "certify.aggregate_checks"} & _reachable(
        graph, "certify.vote")
    assert "query" not in _reachable(graph, "certify.vote")


JOBS = ("certify", "attack", "train_addt")


def _package(module: str) -> str:
    return module.split(".")[0] if "." in module else module


def test_every_module_belongs_to_the_shared_machinery_a_job_or_a_catalog():
    assert {_package(m) for m in _graph()} == {"common", *JOBS, "query", "reports", "compare"}


def test_the_shared_machinery_imports_no_job():
    graph = _graph()
    bad = {m: sorted(d for d in deps if _package(d) != "common")
           for m, deps in graph.items() if _package(m) == "common"}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_job_imports_another_jobs_package():
    graph = _graph()
    bad = {}
    for m, deps in graph.items():
        job = _package(m)
        if job in JOBS:
            other = sorted(d for d in deps if _package(d) not in ("common", job))
            if other:
                bad[m] = other
    assert not bad, f"a job package imports another job's (or the catalog tasks.query): {bad}"


def test_attack_stage_does_not_import_the_summary_or_aggregate_stages():
    graph = _graph()
    assert not {"certify.aggregate", "query", "attack.summary", "certify.report"} & _reachable(graph, "attack.worker")


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for name, cmd in group.commands.items():
        out.add(prefix + (name,))
        if isinstance(cmd, click.Group):
            out |= _commands(cmd, prefix + (name,))
    return out


# A command as messages write it: quoted (`densepure report OUT`, "densepure sql ...") or after
# run/rerun/use; prose such as "this densepure draws" is not a command.
_COMMAND = re.compile(r"(?:[`'\"]|\b(?:run|rerun|use|try) )densepure ([a-z][a-z0-9-]*)"
                      r"(?: ([a-z][a-z0-9-]*))?")


def test_every_densepure_command_named_in_messages_exists():
    from flows.cli import app

    commands = _commands(typer.main.get_command(app))
    groups = {c[0] for c in commands if any(len(d) > 1 and d[0] == c[0] for d in commands)}
    mentioned = []
    for path in sorted(TASKS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in _COMMAND.finditer(node.value):
                    mentioned.append((path.name, m.group(1), m.group(2)))
    assert mentioned, "the scan found no `densepure <command>` at all"
    bad = []
    for where, first, second in mentioned:
        if (first,) not in commands:
            bad.append(f"{where}: densepure {first}")
        elif first in groups and (first, second) not in commands:
            bad.append(f"{where}: densepure {first} {second}")
    assert not bad, f"messages name commands the CLI does not have: {bad}"
