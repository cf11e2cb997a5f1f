"""Deployment runs that land in a run store (tasks/common/store.py), each compared with the last.

A deployment's ``store`` parameter (instead of ``out``) gives every scheduled run an OUT of its
own under the store, continuing the latest run when it is unfinished with the same config. When
the run is complete, it is compared with the store's previous complete run of the same job
(``densepure compare``): the comparison is written next to the run (``OUT/comparison/``) and the
flow run's artifact links the new run and that comparison.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.common.run_dir import RunDir
from tasks.common.store import previous_complete, store_run

__all__ = ["out_in_store", "compare_with_previous"]


def out_in_store(store: str, job: str, config_hash: str, run_name: str) -> str:
    """The OUT of this flow run under ``store``: named after the flow run (or the config's run name)."""
    name = flow_run.get_name() if flow_run.get_id() else None
    return store_run(store, job, config_hash, name or run_name).root


def compare_with_previous(store: str, job: str, out: str, key: str) -> str:
    """Compare the run in ``out`` with the store's previous complete run of ``job``, write the
    comparison under ``OUT/comparison/``, and attach a Markdown artifact (``key``) linking both.
    Returns the artifact's text."""
    from tasks.compare import CompareError, compare_runs, comparison_markdown, write_comparison

    run = RunDir(out)
    previous = previous_complete(store, job, out)
    lines = [f"# New {job} run in {store}", "", f"- run: `{out}`"]
    if previous is None:
        lines.append("- no earlier complete run in the store to compare with")
    else:
        try:
            cmp = compare_runs(previous.run.root, out)
        except CompareError as exc:
            lines.append(f"- not compared with `{previous.run}`: {exc}")
        else:
            md, _ = write_comparison(cmp, run.path("comparison"))
            lines += [f"- compared with the previous complete run `{previous.run}` (A) in `{md}`", "",
                      comparison_markdown(cmp, plot_name=None)]
    text = "\n".join(lines)
    create_markdown_artifact(text, key=key, description=f"the new run in {store} and its comparison")
    return text
