"""The stage layer's structure: imports point one way, and messages name real commands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import typer

TASKS = Path(__file__).resolve().parents[2] / "tasks"


def _imports(path: Path) -> set[str]:
    """The tasks modules ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("tasks.") and a.name.count(".") >= 1}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and node.module and
                                    node.module.split(".")[0] == "tasks"):
                module = node.module if node.level == 1 else node.module.partition(".")[2]
                if module:  # from .x import y / from tasks.x import y
                    found.add(module.split(".")[0])
                else:  # from . import x, y / from tasks import x
                    found |= {a.name for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in TASKS.glob("*.py") if p.stem != "__init__"}
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
    src.write_text("from . import storage, faults\nfrom .layout import X\nimport tasks.plan\n"
                   "def f():\n    from tasks.query import connect\n    from tasks import report\n")
    assert _imports(src) == {"storage", "faults", "layout", "plan", "query", "report"}


def test_tasks_imports_have_no_cycle():
    graph = _graph()
    assert {"layout", "sqlfuncs", "query", "textfmt", "aggregate", "aggregate_sql",
            "aggregate_checks", "vote", "report"} <= set(graph)
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_leaves_import_nothing_above_them():
    graph = _graph()
    assert graph["textfmt"] == set() and graph["sqlfuncs"] == set()
    assert graph["aggregate_sql"] == set() and graph["attack_sql"] == set()
    assert graph["layout"] <= {"storage", "faults"}


def test_vote_stage_does_not_import_the_aggregate_stage():
    graph = _graph()
    assert not {"aggregate", "aggregate_sql", "aggregate_checks"} & _reachable(graph, "vote")
    assert "query" not in _reachable(graph, "vote")


def test_attack_stage_does_not_import_the_summary_or_aggregate_stages():
    graph = _graph()
    assert not {"aggregate", "query", "attack_summary", "report"} & _reachable(graph, "attack")


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
    for path in sorted(TASKS.glob("*.py")):
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
