"""The report flow: rebuild OUT/report.md from the stored results of any job (no GPU, no Ray).

The deployment ``report`` in prefect.yaml runs it (e.g. after a certify run on a cluster, or
after changing the report's code); ``densepure report OUT`` does the same from the command line.
Which report is written follows what OUT holds, as in the CLI: an ADDT training run
(``train_metrics``), an attack evaluation (``attack_summary``) or a certification
(``accuracy`` plus the certified-accuracy plot).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

__all__ = ["report_flow", "rebuild_report"]


def rebuild_report(out: str) -> str:
    """Write OUT/report.md for the job whose results OUT holds; returns its Markdown."""
    from tasks.attack.summary import is_attack_out, write_attack_report
    from tasks.certify.report import write_report
    from tasks.train_addt.train import is_train_out
    from tasks.train_addt.report import write_train_report

    if is_train_out(out):
        return write_train_report(out)
    return write_attack_report(out) if is_attack_out(out) else write_report(out)


@task(name="report")
def report_task(out: str) -> str:
    return rebuild_report(out)


@flow(name="densepure-report")
def report_flow(out: str) -> str:
    """Deployment entry point (prefect.yaml): rebuild ``OUT/report.md`` (a directory or
    ``s3://bucket/prefix``) and attach it to the flow run as a Markdown artifact."""
    report = report_task(out)
    create_markdown_artifact(report, key="densepure-report", description=f"report for {out}")
    return report
