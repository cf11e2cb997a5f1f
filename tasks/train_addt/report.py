"""``OUT/report.md`` of an ADDT training run, built from the stored metrics with DuckDB.

The report says what was trained (run id, config hash, steps, workers, the model folder and how
to use it) and how the loss moved: the steps split into up to ten equal windows, each with its
mean loss, mean gradient norm, learning rate and mean seconds per step (rank 0's wall time).
``densepure report OUT`` rebuilds it; ``densepure sql OUT "SELECT * FROM train_metrics"`` has
every step.
"""

from __future__ import annotations

from tasks.common.run_dir import RunDir
from tasks.common.textfmt import markdown_table
from tasks.train_addt.views import connect

__all__ = ["write_train_report", "WINDOWS_SQL"]

#: Up to ten equal windows of steps (the last may be shorter): loss, gradient norm, lr, speed.
WINDOWS_SQL = """
WITH m AS (SELECT *, max(step) OVER () AS total FROM train_metrics),
w AS (SELECT *, (step - 1) // greatest(1, CAST(ceil(total / 10.0) AS BIGINT)) AS win FROM m)
SELECT min(step) AS first_step, max(step) AS last_step, avg(loss) AS mean_loss, avg(grad_norm) AS mean_grad_norm,
       max(lr) AS lr, avg(seconds) AS seconds_per_step
FROM w GROUP BY win ORDER BY win
"""


def write_train_report(out: RunDir | str) -> str:
    """Write and return ``OUT/report.md`` for the ADDT run in ``out``."""
    out = RunDir.of(out)
    run = out.read_run()
    con = connect(out)
    try:
        rows = con.execute(WINDOWS_SQL).fetchall()
        steps, seconds = con.execute("SELECT count(*), sum(seconds) FROM train_metrics").fetchone()
    finally:
        con.close()
    table = markdown_table(
        ["steps", "mean loss", "mean grad norm", "lr", "s/step"],
        [[f"{a}-{b}", f"{loss:.5f}", f"{g:.3f}", f"{lr:.2e}", f"{s:.3f}"] for a, b, loss, g, lr, s in rows],
        "lrrrr")
    model = run.get("model", "(not exported yet: the run has not finished)")
    lines = [
        f"# ADDT fine-tuning: {run['run_id']}", "",
        f"- config_hash `{run['config_hash']}`; {run['images']} training images; {steps} steps recorded "
        f"({seconds:.0f} s of rank-0 step time), {run.get('workers', '?')} worker(s)",
        f"- final checkpoint: `{run.get('checkpoint', '-')}`; fine-tuned model (EMA weights): `{model}`",
        f"- use it: `densepure attack --set diffusion.source={model}` or "
        f"`densepure certify --set diffusion.source={model}`", "",
        "## Loss", "", table, "",
        "Every step: `densepure sql OUT \"SELECT * FROM train_metrics ORDER BY step\"`.", "",
    ]
    text = "\n".join(lines)
    out.write_text(out.report_uri, text)
    return text
