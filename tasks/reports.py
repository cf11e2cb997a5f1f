"""``densepure report``: rebuild the report of an OUT, or the history page of a run store.

For an OUT, what it holds decides the report: an ADDT training run (``train_metrics``), an attack
evaluation (``attack_summary``) or a certification (``accuracy`` plus the certified-accuracy
plot). The CLI's ``report`` command and the ``report`` deployment (flows/report.py) both call
:func:`rebuild_report`.

For a store (a location holding several runs, :mod:`tasks.common.store`), :func:`write_history`
writes ``STORE/history.md`` and ``STORE/history.png``: per run, in start order, the certified
accuracy at the chosen radii of each (sigma, method) of the certification runs, and the robust
accuracy (majority rule) of each (defense, threat, attack) of the attack runs, with each run's
status.
"""

from __future__ import annotations

import io

from tasks.attack.summary import is_attack_out, write_attack_report
from tasks.certify.report import write_report
from tasks.common.run_dir import RunDir
from tasks.common.run_index import index_runs
from tasks.common.textfmt import markdown_table
from tasks.train_addt.report import write_train_report
from tasks.train_addt.train import is_train_out

__all__ = ["rebuild_report", "write_history", "HISTORY_RADII"]

#: The radii of the history page unless the caller names others.
HISTORY_RADII = (0.0, 0.5, 1.0)


def rebuild_report(out: RunDir | str, radii: list[float] | None = None) -> str:
    """Write OUT/report.md for the job whose results OUT holds, or a store's history page;
    returns its Markdown."""
    run = RunDir.of(out)
    if run.read_config() is None and _is_store(run):
        return write_history(run.root, radii)
    if is_train_out(run):
        return write_train_report(run)
    return write_attack_report(run) if is_attack_out(run) else write_report(run)


def _is_store(run: RunDir) -> bool:
    """Whether ``run`` is a store: the runs found under it are not the location itself."""
    import os

    runs = index_runs([run.root])
    here = run.root if run.is_s3 else os.path.abspath(run.root)
    return not (len(runs) == 1 and (runs[0].run.root if run.is_s3 else os.path.abspath(runs[0].run.root)) == here)


def write_history(store: str, radii: list[float] | None = None) -> str:
    """Write ``STORE/history.md`` and ``STORE/history.png`` (see the module docstring); the Markdown."""
    from tasks.query import connect

    radii = [float(r) for r in (radii or HISTORY_RADII)]
    runs = index_runs([store])
    con = connect([store])
    try:
        views = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        certified = con.execute("""
            SELECT r.started_at, r.run_id, r.status, a.sigma, a.method, a.radius, a.certified_accuracy, a.images
            FROM accuracy a JOIN runs r USING (run_id)
            WHERE list_contains(?::DOUBLE[], a.radius)
            ORDER BY r.started_at, r.run_id, a.sigma, a.method, a.radius""", [radii]).fetchall() \
            if "accuracy" in views else []
        robust = con.sql("""
            SELECT r.started_at, r.run_id, r.status, s.defense, s.threat, s.attack, s.robust_accuracy, s.images
            FROM attack_summary s JOIN runs r USING (run_id) WHERE s.rule = 'majority'
            ORDER BY r.started_at, r.run_id, s.defense, s.threat, s.attack""").fetchall() \
            if "attack_summary" in views else []
    finally:
        con.close()
    lines = [f"# History of {store}", "",
             f"{len(runs)} run(s): " + ", ".join(f"{sum(r.status == s for r in runs)} {s}"
                                                  for s in ("complete", "partial", "failed")) + ".", ""]
    status_rows = [[str(r.run_id), r.job, r.status, str((r.meta or {}).get("created_at") or "-"), str(r.run)]
                   for r in runs]
    lines += ["## Runs", "", markdown_table(["run", "job", "status", "started", "OUT"], status_rows, "lllll"), ""]
    series: dict[str, list[tuple]] = {}
    if certified:
        keys = sorted({(c[3], c[4]) for c in certified})
        header = ["started", "run", "status"] + [f"{m} s={s} r={r:g}" for s, m in keys for r in radii]
        by_run: dict[tuple, dict] = {}
        for started, run_id, status, sigma, method, radius, acc, _ in certified:
            by_run.setdefault((started, run_id, status), {})[(sigma, method, radius)] = acc
            series.setdefault(f"{method} s={sigma} r={radius:g}", []).append((started, acc))
        body = [[str(k[0])[:19], k[1], k[2], *("-" if (v := vals.get((s, m, r))) is None else f"{100 * v:.1f}"
                                                for s, m in keys for r in radii)] for k, vals in by_run.items()]
        lines += ["## Certified accuracy (%)", "", markdown_table(header, body, "lll" + "r" * (len(header) - 3)), ""]
    if robust:
        keys = sorted({(d, t, a) for _, _, _, d, t, a, _, _ in robust})
        header = ["started", "run", "status"] + [f"{d} {t} {a}" for d, t, a in keys]
        by_run = {}
        for started, run_id, status, d, t, a, acc, _ in robust:
            by_run.setdefault((started, run_id, status), {})[(d, t, a)] = acc
            series.setdefault(f"{d} {t} {a}", []).append((started, acc))
        body = [[str(k[0])[:19], k[1], k[2], *("-" if (v := vals.get(key)) is None else f"{100 * v:.1f}"
                                                for key in keys)] for k, vals in by_run.items()]
        lines += ["## Robust accuracy (%, majority rule)", "", markdown_table(header, body, "lll" + "r" * len(keys)), ""]
    if not certified and not robust:
        lines += ["No run of this store has published certification or attack tables yet.", ""]
    target = RunDir(store)
    if series:
        lines += ["![history](history.png)", ""]
        target.write_bytes(target.path("history.png"), _plot(series))
    text = "\n".join(lines)
    target.write_text(target.path("history.md"), text)
    return text


def _plot(series: dict[str, list[tuple]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        points = [(t, v) for t, v in points if t is not None and v is not None]
        if points:
            ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("run start (UTC)")
    ax.legend(fontsize=6)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
