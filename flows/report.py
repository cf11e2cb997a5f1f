"""The report flow: rebuild OUT/report.md from the stored results of any job (no GPU, no Ray).

The deployment ``report`` in prefect.yaml runs it (e.g. after a certify run on a cluster, or
after changing the report's code); ``densepure report OUT`` does the same from the command line.
Both call :func:`tasks.reports.rebuild_report`: which report is written follows what OUT holds.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

__all__ = ["report_flow"]


@task(name="report")
def report_task(out: str) -> str:
    from tasks.reports import rebuild_report

    return rebuild_report(out)


@flow(name="densepure-report")
def report_flow(out: str) -> str:
    """Deployment entry point (prefect.yaml): rebuild ``OUT/report.md`` (a directory or
    ``s3://bucket/prefix``) and attach it to the flow run as a Markdown artifact."""
    report = report_task(out)
    create_markdown_artifact(report, key="densepure-report", description=f"report for {out}")
    return report
