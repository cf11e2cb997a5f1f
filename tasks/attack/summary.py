"""Stage 3 of ``densepure attack``: the robust-accuracy table and the report.

``attack_summary`` (one row per defense, threat model, attack and scoring rule:
:data:`tasks.common.layout.ATTACK_SUMMARY_SCHEMA`) is one SQL query over the ``attacks`` rows
(:data:`tasks.attack.summary_sql.SUMMARY_SQL`): the same query backs the ``attack_summary`` view of ``densepure sql``
and the published ``OUT/tables/attack_summary.parquet``, so the two never disagree.

Accuracies are means over images; the intervals are Wilson score intervals at 95 % over the
images (``wilson_low``/``wilson_high``, :func:`densepure_core.certification.stats.wilson_interval`). For the
``mean`` rule an image contributes its fraction of correct purifications (a number in [0, 1]),
and the interval is Wilson's with that fractional count: it describes the uncertainty from the
choice of images, not from the M purifications of each.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from tasks.attack.summary_sql import CONFIDENCE, SUMMARY_SQL
from tasks.common.layout import ATTACK_SUMMARY_SCHEMA
from tasks.common.run_dir import RunDir
from tasks.common.textfmt import markdown_table

__all__ = ["SUMMARY_SQL", "CONFIDENCE", "SummaryError", "check_partitions", "summary_table", "write_attack_report",
           "is_attack_out"]

def is_attack_out(out: RunDir | str) -> bool:
    """Whether OUT holds an attack evaluation (its config.yaml says ``job: attack``)."""
    run = RunDir.of(out)
    job = run.job()
    return bool(run.attack_files()) if job is None else job == "attack"


def summary_table(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """:data:`SUMMARY_SQL` on ``con`` (which has the ``attacks`` view), as ATTACK_SUMMARY_SCHEMA."""
    return con.sql(SUMMARY_SQL).to_arrow_table().cast(ATTACK_SUMMARY_SCHEMA)


class SummaryError(ValueError):
    """The attack rows cannot be summarized as they are; the message names the partition and what to do."""


def check_partitions(con: duckdb.DuckDBPyConnection) -> None:
    """Refuse a (defense, threat, attack) partition whose rows come from more than one run, config
    or model (NULL fingerprints: rows written before fingerprints were recorded)."""
    for column, what in (("run_id", "runs"), ("config_hash", "configs"),
                         ("classifier_fingerprint", "classifiers"), ("diffusion_fingerprint", "diffusion models")):
        mixed = con.sql(f"""
            SELECT defense, threat, attack, list(DISTINCT {column} ORDER BY {column})
            FROM attacks WHERE {column} IS NOT NULL GROUP BY ALL HAVING count(DISTINCT {column}) > 1
            ORDER BY ALL LIMIT 1""").fetchall()
        if mixed:
            d, t, a, values = mixed[0]
            raise SummaryError(
                f"partition defense={d} threat={t} attack={a} holds rows of {len(values)} different {what} "
                f"({column} {values}); results of different runs, configs or models are never pooled: "
                f"evaluate into a new --out, or delete that partition's shards under attacks/ and rerun.")


def _pct(v, lo, hi) -> str:
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_attack_report(out: RunDir | str, *, expected: dict | None = None) -> str:
    """Publish ``tables/attack_summary.parquet`` and ``report.md`` of an attack OUT; return the report.

    Args:
        out: the OUT (a :class:`RunDir` or its root).
        expected: {(defense, threat, attack): planned images minus quarantined}, to flag partitions
            with missing rows (None: not checked).
    """
    from tasks.attack.views import connect
    from tasks.common.sql import has_view

    run = RunDir.of(out)
    con = connect(run)
    try:
        check_partitions(con)
        table = summary_table(con)
        quarantined = {}
        if has_view(con, "errors"):
            quarantined = dict(con.sql("SELECT method, count(*) FROM errors GROUP BY ALL").fetchall())
        settings = con.sql("""
            SELECT defense, threat, attack, any_value(attack_kind), any_value(norm), any_value(eps),
                   any_value(t_star), any_value(steps), any_value(k), any_value(iterations), any_value(eot),
                   any_value(step_size), any_value(random_start), any_value(score_purifications),
                   coalesce(CAST(any_value(iterate_purifications) AS VARCHAR), '-')
            FROM attacks GROUP BY ALL ORDER BY defense, any_value(norm), any_value(eps), threat, attack""").fetchall()
    finally:
        con.close()
    run.write_parquet(run.tables_uri("attack_summary.parquet"), table)
    rows = table.to_pylist()
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["defense"], r["threat"], r["attack"]), {})[r["rule"]] = r
    lines = ["# Attack evaluation report", "",
             f"Run `{rows[0]['run_id'] if rows else '-'}`. Robust accuracy (%) with Wilson {100 * CONFIDENCE:.0f} % "
             "intervals over the images. Last-iterate protocol: the final adversarial example under three scoring "
             "rules over the M scoring purifications: mean (fraction of purifications correct), majority "
             "(majority label correct), worst (every purification correct); clean accuracy is scored the same way, "
             "on the same purifications (mean rule shown). Any-iterate protocol (DiffBreak; only where the run "
             "set any_iterate, else '-'): the clean image and every PGD iterate checked against M' fresh "
             "purifications each, the image lost if any check's majority (majority) or any one purification "
             "(worst) is wrong. dwbox rows are scored under the attack's own fixed noise.", ""]
    table_rows = []
    for (d, t, a), rules in by_key.items():
        mean = rules["mean"]
        cells = [_pct(r["robust_accuracy"], r["robust_low"], r["robust_high"]) if r else "-"
                 for r in (rules.get(rule) for rule in ("mean", "majority", "worst", "majority_any", "worst_any"))]
        table_rows.append([d, t, a, str(mean["images"]),
                           _pct(mean["clean_accuracy"], mean["clean_low"], mean["clean_high"]), *cells,
                           f"{mean['gradient_calls']:.0f}", f"{mean['unet_calls']:.0f}", f"{mean['seconds']:.2f}"])
    lines.append(markdown_table(["defense", "threat", "attack", "images", "clean (mean)", "robust mean (last, M)",
                                 "robust majority (last, M)", "robust worst (last, M)", "robust majority (any, M')",
                                 "robust worst (any, M')", "grad calls/img", "UNet calls/img", "s/img"],
                                table_rows, "lllrrrrrrrrrr"))
    lines += ["", "## Settings", ""]
    lines.append(markdown_table(
        ["defense", "threat", "attack", "kind", "norm", "eps", "t*", "UNet calls/purification", "K", "iterations",
         "purifications/gradient", "step", "random start", "M", "M'"],
        [[str(v) if not isinstance(v, float) else f"{v:.4g}" for v in s] for s in settings], "llllllrrrrrrlrr"))
    missing = []
    if expected:
        have = {k: r["mean"]["images"] for k, r in by_key.items()}
        missing = [(k, n, have.get(k, 0)) for k, n in expected.items() if have.get(k, 0) < n]
    if missing:
        lines += ["", "**Incomplete partitions** (rows missing; rerun the same command to finish them):", ""]
        lines += [f"- {'/'.join(k)}: {got} of {n} images" for k, n, got in missing]
    if quarantined:
        lines += ["", "**Quarantined images** (see `densepure sql OUT \"SELECT * FROM errors\"`):", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(quarantined.items())]
    text = "\n".join(lines) + "\n"
    run.write_text(run.report_uri, text)
    return text
