"""``densepure compare A B``: two runs of one job on the same images, paired image by image.

Certification: per (sigma, method) and radius r, each image matched by ``image_id`` is certified
correct at r in A, in B, in both or in neither (correct and radius >= r; images with an unknown
label are left out). The table gives both certified accuracies, their difference B - A with
Newcombe's paired 95 % interval (:func:`densepure_core.certification.stats.paired_difference_interval`)
and the exact McNemar test on the discordant images (a two-sided binomial test of "A only" against
"B only" at p = 1/2: :func:`densepure_core.certification.stats.binomial_test_pvalue`).

Attack evaluation: per (defense, threat, attack) and scoring rule, the same on robust accuracy
(``majority`` and ``worst`` of the last iterate, and DiffBreak's ``majority_any`` and ``worst_any``
where both runs checked every iterate: one 0/1 outcome per image). The ``mean`` rule's outcome is a fraction
per image: its difference gets a paired t interval and the exact sign test on the images whose
fractions differ.

Different configs may be compared: the fields that differ are listed first. Images of one run
only are counted and left out (the report says how many).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

from densepure_core.certification.stats import binomial_test_pvalue, paired_difference_interval
from tasks.common.planning import flat_fields
from tasks.common.run_dir import RunDir
from tasks.common.run_index import RunFiles, index_runs
from tasks.common.sql import has_view
from tasks.common.textfmt import format_rows, markdown_table
from tasks.query import connect

__all__ = ["Comparison", "CompareError", "compare_runs", "comparison_summary", "comparison_markdown",
           "write_comparison",
           "CERTIFY_COLUMNS", "ATTACK_COLUMNS"]

CONFIDENCE = 0.95
CERTIFY_COLUMNS = ["sigma", "method", "radius", "images", "accuracy_a", "accuracy_b", "difference",
                   "difference_low", "difference_high", "a_only", "b_only", "p_value"]
ATTACK_COLUMNS = ["defense", "threat", "attack", "rule", "images", "robust_a", "robust_b", "difference",
                  "difference_low", "difference_high", "a_only", "b_only", "p_value"]


class CompareError(ValueError):
    """Two locations that cannot be compared; the message says why."""


@dataclass
class Comparison:
    """What :func:`compare_runs` found (see the module docstring)."""

    a: RunFiles
    b: RunFiles
    job: str
    differing: list[str]
    matched: int  # images in both runs (summed over partitions)
    only_a: int
    only_b: int
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    alphas: tuple[float | None, float | None] = (None, None)

    def text(self, fmt: str = "table") -> str:
        """The table as text, CSV or JSON (:func:`tasks.common.textfmt.format_rows`)."""
        return format_rows(self.columns, [[r[c] for c in self.columns] for r in self.rows], fmt)


def _one_run(location: str) -> RunFiles:
    runs = index_runs([location])
    if len(runs) != 1:
        raise CompareError(f"{location} holds {len(runs)} runs; compare takes one OUT on each side (pick one "
                           f"of: {', '.join(r.run.root for r in runs[:5])})")
    return runs[0]


def _differing(a: RunFiles, b: RunFiles) -> list[str]:
    """The config fields (dotted) whose values differ, operational ones included, `out` excepted."""
    fa, fb = flat_fields(dict(a.config)), flat_fields(dict(b.config))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in ("out", "run_name"))


def _paired_rows(tables: np.ndarray) -> list[tuple]:
    """(difference, low, high, p) for 2x2 count rows ``[both, a_only, b_only, neither]``."""
    both, a_only, b_only, neither = tables.T
    low, high = paired_difference_interval(both, a_only, b_only, neither, CONFIDENCE)
    n = tables.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = (b_only - a_only) / n
    return list(zip(diff, low, high, binomial_test_pvalue(a_only, b_only)))


def compare_runs(a_location: str, b_location: str, *, radii: list[float] | None = None,
                 alpha: float | None = None) -> Comparison:
    """Compare run A with run B (each an OUT); see the module docstring.

    Args:
        a_location, b_location: the two OUTs (local or ``s3://``).
        radii: certification: the radii to compare at (default: A's published grid).
        alpha: certification: re-certify both at this alpha from the votes (default: each run's
            published certificates; the result says both alphas).

    Raises:
        CompareError: not one run on a side, runs of two jobs, or nothing in common.
    """
    a, b = _one_run(a_location), _one_run(b_location)
    if a.job != b.job:
        raise CompareError(f"{a.run} holds a {a.job} run and {b.run} a {b.job} run: compare two runs of one job")
    if a.run_id == b.run_id and a.run_id is not None:
        raise CompareError(f"{a.run} and {b.run} hold the same run {a.run_id}: compare two different runs")
    con = connect([a.run.root, b.run.root], alpha=alpha)
    try:
        if a.job == "certify":
            return _compare_certification(con, a, b, radii)
        if a.job == "attack":
            return _compare_attacks(con, a, b)
        raise CompareError(f"compare takes certification or attack runs; {a.run} holds a {a.job} run "
                           f"(its train_metrics: densepure sql {a.run} {b.run} \"SELECT ...\")")
    finally:
        con.close()


def _matching(con, table: str, keys: str, a: RunFiles, b: RunFiles) -> tuple[int, int, int]:
    """(matched, only in A, only in B) image-partition pairs of ``table``, matched on ``keys``."""
    return con.execute(f"""
        WITH x AS (SELECT {keys}, image_id FROM {table} WHERE run_id = ?),
             y AS (SELECT {keys}, image_id FROM {table} WHERE run_id = ?)
        SELECT (SELECT count(*) FROM x JOIN y USING ({keys}, image_id)),
               (SELECT count(*) FROM x ANTI JOIN y USING ({keys}, image_id)),
               (SELECT count(*) FROM y ANTI JOIN x USING ({keys}, image_id))""", [a.run_id, b.run_id]).fetchone()


def _compare_certification(con, a: RunFiles, b: RunFiles, radii: list[float] | None) -> Comparison:
    if not has_view(con, "certificates"):
        raise CompareError(f"no published certificates in {a.run} or {b.run}: finish the runs (rerun densepure "
                           f"certify on each), or pass --alpha to certify both from their votes")
    if radii is None:
        radii = [r[0] for r in con.execute("SELECT DISTINCT radius FROM accuracy WHERE run_id = ? ORDER BY 1",
                                           [a.run_id]).fetchall()] or [0.0, 0.5, 1.0]
    alphas = tuple(con.execute("SELECT max(alpha) FROM certificates WHERE run_id = ?", [r.run_id]).fetchone()[0]
                   for r in (a, b))
    matched, only_a, only_b = _matching(con, "certificates", "sigma, method", a, b)
    counts = con.execute(f"""
        WITH r AS (SELECT unnest(?::DOUBLE[]) AS radius),
        x AS (SELECT sigma, method, image_id, correct, radius AS rad FROM certificates WHERE run_id = ?),
        y AS (SELECT sigma, method, image_id, correct, radius AS rad FROM certificates WHERE run_id = ?),
        p AS (SELECT x.sigma, x.method, r.radius,
                     (x.correct AND x.rad >= r.radius) AS ok_a, (y.correct AND y.rad >= r.radius) AS ok_b
              FROM x JOIN y USING (sigma, method, image_id), r
              WHERE x.correct IS NOT NULL AND y.correct IS NOT NULL)
        SELECT sigma, method, radius, count(*) FILTER (ok_a AND ok_b), count(*) FILTER (ok_a AND NOT ok_b),
               count(*) FILTER (ok_b AND NOT ok_a), count(*) FILTER (NOT ok_a AND NOT ok_b)
        FROM p GROUP BY ALL ORDER BY sigma, method, radius""", [list(map(float, radii)), a.run_id, b.run_id]).fetchall()
    if not counts:
        raise CompareError(f"{a.run} and {b.run} share no labelled image of any (sigma, method): nothing to pair")
    tables = np.array([c[3:] for c in counts], dtype=np.int64)
    rows = []
    for (sigma, method, radius, both, a_only, b_only, neither), (diff, low, high, p) in zip(
            counts, _paired_rows(tables)):
        n = both + a_only + b_only + neither
        rows.append({"sigma": sigma, "method": method, "radius": radius, "images": n,
                     "accuracy_a": (both + a_only) / n, "accuracy_b": (both + b_only) / n, "difference": float(diff),
                     "difference_low": float(low), "difference_high": float(high), "a_only": a_only,
                     "b_only": b_only, "p_value": float(p)})
    return Comparison(a, b, "certify", _differing(a, b), matched, only_a, only_b, CERTIFY_COLUMNS, rows, alphas)


def _compare_attacks(con, a: RunFiles, b: RunFiles) -> Comparison:
    matched, only_a, only_b = _matching(con, "attacks", "defense, threat, attack", a, b)
    rows = []
    # last-iterate rules, and DiffBreak's any-iterate ones where both runs checked every iterate
    for rule, column in (("majority", "adv_majority"), ("worst", "adv_worst"),
                         ("majority_any", "broken_at_majority = -1"), ("worst_any", "broken_at_worst = -1")):
        counts = con.execute(f"""
            WITH x AS (SELECT defense, threat, attack, image_id, {column} AS ok FROM attacks
                       WHERE run_id = ? AND {column} IS NOT NULL),
                 y AS (SELECT defense, threat, attack, image_id, {column} AS ok FROM attacks
                       WHERE run_id = ? AND {column} IS NOT NULL)
            SELECT defense, threat, attack, count(*) FILTER (x.ok AND y.ok), count(*) FILTER (x.ok AND NOT y.ok),
                   count(*) FILTER (y.ok AND NOT x.ok), count(*) FILTER (NOT x.ok AND NOT y.ok)
            FROM x JOIN y USING (defense, threat, attack, image_id) GROUP BY ALL""", [a.run_id, b.run_id]).fetchall()
        if not counts:
            continue
        tables = np.array([c[3:] for c in counts], dtype=np.int64)
        for (d, t, at, both, a_only, b_only, neither), (diff, low, high, p) in zip(counts, _paired_rows(tables)):
            n = both + a_only + b_only + neither
            rows.append({"defense": d, "threat": t, "attack": at, "rule": rule, "images": n,
                         "robust_a": (both + a_only) / n, "robust_b": (both + b_only) / n, "difference": float(diff),
                         "difference_low": float(low), "difference_high": float(high), "a_only": a_only,
                         "b_only": b_only, "p_value": float(p)})
    means = con.execute("""
        WITH x AS (SELECT defense, threat, attack, image_id, adv_mean AS v FROM attacks WHERE run_id = ?),
             y AS (SELECT defense, threat, attack, image_id, adv_mean AS v FROM attacks WHERE run_id = ?)
        SELECT defense, threat, attack, list(x.v ORDER BY image_id), list(y.v ORDER BY image_id)
        FROM x JOIN y USING (defense, threat, attack, image_id) GROUP BY ALL""", [a.run_id, b.run_id]).fetchall()
    for d, t, at, va, vb in means:
        va, vb = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
        diffs = vb - va
        n = len(diffs)
        mean = float(diffs.mean())
        half = (float(sps.t.ppf((1 + CONFIDENCE) / 2, n - 1) * diffs.std(ddof=1) / np.sqrt(n))
                if n > 1 else float("nan"))
        up, down = int((diffs > 0).sum()), int((diffs < 0).sum())
        rows.append({"defense": d, "threat": t, "attack": at, "rule": "mean", "images": n,
                     "robust_a": float(va.mean()), "robust_b": float(vb.mean()), "difference": mean,
                     "difference_low": mean - half, "difference_high": mean + half, "a_only": down,
                     "b_only": up, "p_value": float(binomial_test_pvalue(down, up))})
    if not rows:
        raise CompareError(f"{a.run} and {b.run} share no attacked image of any (defense, threat, attack)")
    order = {"mean": 0, "majority": 1, "worst": 2, "majority_any": 3, "worst_any": 4}
    rows.sort(key=lambda r: (r["defense"], r["threat"], r["attack"], order[r["rule"]]))
    return Comparison(a, b, "attack", _differing(a, b), matched, only_a, only_b, ATTACK_COLUMNS, rows)


# -- the report ------------------------------------------------------------------------------------

def comparison_summary(cmp: Comparison) -> list[str]:
    """What is compared, before the table: the runs, the config fields that differ, the pairing."""
    a, b = cmp.a, cmp.b
    lines = [f"- A: `{a.run_id}` ({a.run}), status {a.status}, config_hash `{(a.meta or {}).get('config_hash')}`",
             f"- B: `{b.run_id}` ({b.run}), status {b.status}, config_hash `{(b.meta or {}).get('config_hash')}`",
             "- config fields that differ: " + (", ".join(f"`{f}`" for f in cmp.differing) or "none"),
             f"- images paired by image_id: {cmp.matched} image-partitions in both; {cmp.only_a} in A only and "
             f"{cmp.only_b} in B only (left out)"]
    if cmp.job == "certify":
        lines.append(f"- certificates at alpha {cmp.alphas[0]} (A) and {cmp.alphas[1]} (B)"
                     + ("" if cmp.alphas[0] == cmp.alphas[1] else ": different alphas; pass --alpha to compare "
                                                                   "at one"))
    return lines


def comparison_markdown(cmp: Comparison, plot_name: str | None = "comparison.png") -> str:
    """A Markdown page: the runs, the config fields that differ, the image matching, the table."""
    what = "certified accuracy" if cmp.job == "certify" else "robust accuracy"
    lines = [f"# Comparison of two {cmp.job} runs", "", *comparison_summary(cmp)]
    lines += ["", f"Difference = B - A of the {what}, with Newcombe's paired {100 * CONFIDENCE:.0f} % interval; "
              "p: exact McNemar test on the images correct under one run only (a_only, b_only)"
              + ("; the mean rule: paired t interval and the sign test." if cmp.job == "attack" else "."), ""]
    keys = ["sigma", "method", "radius"] if cmp.job == "certify" else ["defense", "threat", "attack", "rule"]
    accs = ["accuracy_a", "accuracy_b"] if cmp.job == "certify" else ["robust_a", "robust_b"]
    header = keys + ["images", "A (%)", "B (%)", "B - A (points)", f"{100 * CONFIDENCE:.0f} % interval",
                     "A only", "B only", "p"]
    body = [[*(str(r[k]) for k in keys), str(r["images"]), f"{100 * r[accs[0]]:.1f}", f"{100 * r[accs[1]]:.1f}",
             f"{100 * r['difference']:+.1f}", f"[{100 * r['difference_low']:+.1f}, {100 * r['difference_high']:+.1f}]",
             str(r["a_only"]), str(r["b_only"]), f"{r['p_value']:.3g}"] for r in cmp.rows]
    lines += [markdown_table(header, body, "l" * len(keys) + "r" * 8), ""]
    if plot_name:
        lines += [f"![{what}, A against B]({plot_name})", ""]
    return "\n".join(lines)


def comparison_plot(cmp: Comparison) -> bytes:
    """A PNG: certified accuracy against the radius for A and B per (sigma, method), or the
    robust-accuracy difference with its interval per attack partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if cmp.job == "certify":
        parts: dict[tuple, list[dict]] = {}
        for r in cmp.rows:
            parts.setdefault((r["sigma"], r["method"]), []).append(r)
        for i, ((sigma, method), rows) in enumerate(parts.items()):
            color = f"C{i % 10}"
            x = [r["radius"] for r in rows]
            ax.plot(x, [r["accuracy_a"] for r in rows], color=color, linestyle="--", label=f"A {method} s={sigma}")
            ax.plot(x, [r["accuracy_b"] for r in rows], color=color, label=f"B {method} s={sigma}")
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy")
        ax.legend(fontsize=7)
    else:
        rows = cmp.rows
        y = np.arange(len(rows))
        diff = np.array([r["difference"] for r in rows])
        err = np.array([[r["difference"] - r["difference_low"] for r in rows],
                        [r["difference_high"] - r["difference"] for r in rows]])
        ax.errorbar(diff, y, xerr=err, fmt="o")
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(y, [f"{r['defense']} {r['threat']} {r['attack']} {r['rule']}" for r in rows], fontsize=7)
        ax.set_xlabel("robust accuracy, B - A")
    ax.set_title(f"A {cmp.a.run_id}  vs  B {cmp.b.run_id}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_comparison(cmp: Comparison, dest: RunDir | str) -> tuple[str, str]:
    """Write ``comparison.md``, ``comparison.png`` and ``comparison.json`` under ``dest``; their URIs."""
    dest = RunDir.of(dest)
    md, png = dest.path("comparison.md"), dest.path("comparison.png")
    dest.write_bytes(png, comparison_plot(cmp))
    dest.write_text(md, comparison_markdown(cmp))
    dest.write_text(dest.path("comparison.json"), json.dumps(
        {"a": cmp.a.run_id, "b": cmp.b.run_id, "job": cmp.job, "differing": cmp.differing, "matched": cmp.matched,
         "only_a": cmp.only_a, "only_b": cmp.only_b, "rows": cmp.rows}, indent=2, default=float))
    return md, png
