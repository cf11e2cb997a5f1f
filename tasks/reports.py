"""``densepure report``: rebuild ``OUT/report.md`` for whichever job OUT holds (no GPU, no Ray).

What OUT holds decides the report: an ADDT training run (``train_metrics``), an attack
evaluation (``attack_summary``) or a certification (``accuracy`` plus the certified-accuracy
plot). The CLI's ``report`` command and the ``report`` deployment (flows/report.py) both call
:func:`rebuild_report`.
"""

from __future__ import annotations

from tasks.attack.summary import is_attack_out, write_attack_report
from tasks.certify.report import write_report
from tasks.common.run_dir import RunDir
from tasks.train_addt.report import write_train_report
from tasks.train_addt.train import is_train_out

__all__ = ["rebuild_report"]


def rebuild_report(out: RunDir | str) -> str:
    """Write OUT/report.md for the job whose results OUT holds; returns its Markdown."""
    run = RunDir.of(out)
    if is_train_out(run):
        return write_train_report(run)
    return write_attack_report(run) if is_attack_out(run) else write_report(run)
