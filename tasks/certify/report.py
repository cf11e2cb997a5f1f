"""Human-facing outputs of a run: report.md, the certified-accuracy plot, Cohen-style TSV files.

Everything here reads the published tables (``OUT/tables/*.parquet``, written by
tasks/certify/aggregate.py) and the vote files through the read-only connection of
:func:`tasks.certify.views.connect`; nothing is recomputed from images.

- :func:`write_report`: ``OUT/report.md`` (certified accuracy per sigma and method at Cohen's
  radii, image counts, abstention rate, mean UNet/classifier calls and seconds per image, a
  note on missing images) and ``OUT/certified_accuracy.png``;
- :func:`format_accuracy_table`: the plain-text accuracy table the CLI prints;
- :func:`export_tsv`: the ``idx label predict radius correct time`` files that the analysis
  scripts of Cohen et al., Carlini et al. and DensePure read.

Example::

    from tasks.certify.report import write_report, export_tsv
    print(write_report("results/run1"))
    export_tsv("results/run1")   # results/run1/tsv/sigma=0.25_method=dds.tsv, ...
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.certify.aggregate_sql import accuracy_sql
from tasks.certify.views import connect
from tasks.common import storage
from tasks.common.layout import tsv_name
from tasks.common.quarantine import quarantined_counts, read_errors
from tasks.common.run_dir import RunDir
from tasks.common.sql import has_view
from tasks.common.textfmt import markdown_table, text_table

__all__ = ["REPORT_RADII", "TSV_HEADER", "ReportError", "write_report", "format_accuracy_table",
           "export_tsv"]

# The radii of Cohen et al.'s ImageNet table (0 to 3 in steps of 0.5); 3.0 is about the cap of
# sigma = 1.0 at n = 10^4 (3.2 sigma), so wider radii would print zeros for every setting.
REPORT_RADII: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)

# Exactly the header line of Cohen et al.'s code/certify.py (and its DDS/DensePure copies).
TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


class ReportError(ValueError):
    """The report cannot be made from OUT as it is; the message says what to run first."""


# ------------------------------------------------------------------------------------------
# accuracy table
# ------------------------------------------------------------------------------------------

def _rows(accuracy_rows: Iterable[Mapping[str, Any]] | pa.Table) -> list[Mapping[str, Any]]:
    if isinstance(accuracy_rows, pa.Table):
        return accuracy_rows.to_pylist()
    return list(accuracy_rows)


def _pivot(accuracy_rows) -> tuple[list[float], list[tuple[float, str, int, list[float | None]]]]:
    """Accuracy rows -> (sorted radii, [(sigma, method, images, [accuracy per radius])])."""
    rows = _rows(accuracy_rows)
    radii = sorted({float(r["radius"]) for r in rows})
    parts: dict[tuple[float, str], dict[str, Any]] = {}
    for r in rows:
        key = (float(r["sigma"]), str(r["method"]))
        entry = parts.setdefault(key, {"images": int(r["images"]), "acc": {}})
        entry["acc"][float(r["radius"])] = r["certified_accuracy"]
    table = [(sigma, method, e["images"], [e["acc"].get(x) for x in radii])
             for (sigma, method), e in sorted(parts.items())]
    return radii, table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def format_accuracy_table(accuracy_rows: Iterable[Mapping[str, Any]] | pa.Table) -> str:
    """The certified-accuracy table as aligned plain text, one row per (sigma, method).

    Columns: sigma, method, images (the accuracy denominator), then the certified accuracy in
    percent (one decimal) at each radius present in the rows; ``-`` where it is undefined.

    Args:
        accuracy_rows: rows of the ``accuracy`` table (mappings with sigma, method, radius,
            certified_accuracy, images; extra keys ignored) or the table itself.

    Returns:
        The text, a title line first, without a trailing newline.

    Example:
        >>> print(format_accuracy_table([
        ...     {"sigma": 0.25, "method": "dds", "radius": 0.0, "certified_accuracy": 0.75,
        ...      "images": 4},
        ...     {"sigma": 0.25, "method": "dds", "radius": 0.5, "certified_accuracy": 0.5,
        ...      "images": 4}]))
        certified accuracy (%) at L2 radius r
        sigma  method  images  r=0  r=0.5
        -----  ------  ------  ----  -----
         0.25  dds          4  75.0   50.0
    """
    radii, table = _pivot(accuracy_rows)
    columns = ["sigma", "method", "images"] + [f"r={r:g}" for r in radii]
    body = [[f"{sigma:g}", method, str(images)] + [_pct(a) for a in accs]
            for sigma, method, images, accs in table]
    align = "rlr" + "r" * len(radii)
    return "certified accuracy (%) at L2 radius r\n" + text_table(columns, body, footer=False,
                                                                  align=align)


# ------------------------------------------------------------------------------------------
# report.md + plot
# ------------------------------------------------------------------------------------------

def _require_tables(run: RunDir) -> None:
    for name in ("certificates.parquet", "accuracy.parquet"):
        if not run.exists(run.tables_uri(name)):
            if not run.exists(run.config_uri):  # not even a plan: a wrong path, or nothing run
                raise ReportError(f"{run} holds no densepure run (no config.yaml, no tables): check the "
                                  f"path, or certify into it first (`densepure certify --out` with this path)")
            raise ReportError(f"{run.tables_uri(name)} does not exist: run the aggregate stage "
                              "first: rerun `densepure certify` with the run's config and --out "
                              "(it votes only what is missing, then publishes the tables and the "
                              "report); `densepure report OUT` rebuilds the report after that")


def _read_summary(run: RunDir) -> dict[str, Any] | None:
    uri = run.tables_uri("summary.json")
    if not run.exists(uri):
        return None
    return json.loads(run.read_text(uri))


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _human(v: float | None) -> str:
    """Means and totals for people: 10,100 rather than 1.01e+04, 0.125 rather than 0.12500."""
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def write_report(out: RunDir | str, *, title: str | None = None) -> str:
    """Write ``OUT/report.md`` and ``OUT/certified_accuracy.png``; return the markdown.

    The report holds: alpha, run and config ids; the certified accuracy (%) per sigma and
    method at :data:`REPORT_RADII`; per partition the images, expected and missing images (from
    ``tables/summary.json``), the abstention rate, n0/n/K/S, and mean UNet calls, classifier
    calls and seconds per image from the votes; a warning when images are missing; the plot.

    Args:
        out: the OUT (a :class:`RunDir` or its root, local or ``s3://``), with published tables.
        title: the report's first heading (default "Certification report").

    Returns:
        The markdown text written to ``OUT/report.md``.

    Raises:
        ReportError: the tables have not been published yet.
    """
    run = RunDir.of(out)
    _require_tables(run)
    summary = _read_summary(run)
    con = connect(run)
    try:
        has_votes = has_view(con, "votes")
        acc_rows = con.sql(accuracy_sql(REPORT_RADII, "certificates")).to_arrow_table()
        # coalesce: no certificates at all when every image was quarantined
        meta = con.sql("""
            SELECT coalesce(list(DISTINCT alpha ORDER BY alpha), []),
                   coalesce(list(DISTINCT run_id ORDER BY run_id), [])
            FROM certificates""").fetchall()[0]
        # certificates published before the sampling columns existed are all fixed CERTIFY
        cert_columns = {d[0] for d in con.sql("SELECT * FROM certificates LIMIT 0").description}
        adaptive = "sampling" in cert_columns and bool(con.sql(
            "SELECT count(*) FROM certificates WHERE sampling = 'adaptive'").fetchall()[0][0])
        abst = {(s, m): (images, abstained) for s, m, images, abstained in con.sql("""
            SELECT sigma, method, count(*), count(*) FILTER (WHERE prediction = -1)
            FROM certificates GROUP BY ALL""").fetchall()}
        cost: dict[tuple[float, str], tuple] = {}
        if has_votes:
            for row in con.sql("""
                    SELECT sigma, method, any_value(config_hash), min(n0), max(n0), min(n),
                           max(n), min(k), max(k), min(steps), max(steps), min(t_star),
                           avg(unet_calls), avg(classifier_calls), avg(seconds), sum(seconds)
                    FROM votes GROUP BY ALL""").fetchall():
                cost[(row[0], row[1])] = row[2:]
        curves = _curves(con)
    finally:
        con.close()

    alphas, runs = meta
    if not alphas and summary:  # no certificates: the tables' alpha and the plan's run
        alphas = [summary["alpha"]]
    if not runs and run.exists(run.run_uri):
        runs = [run.read_run()["run_id"]]
    missing_parts = [p for p in (summary or {}).get("partitions", []) if p.get("missing")]
    expected = {(p["sigma"], p["method"]): p for p in (summary or {}).get("partitions", [])}
    lines = [f"# {title or 'Certification report'}", ""]
    lines.append(f"- OUT: `{run}`")
    lines.append(f"- run: {', '.join(f'`{r}`' for r in runs) or '-'}")
    lines.append(f"- alpha: {', '.join(f'{a:g}' for a in alphas)} (one-sided Clopper-Pearson, "
                 "CERTIFY of Cohen et al. 2019)")
    if adaptive:
        lines.append("- sampling: adaptive rows are certified with their anytime-valid bound at "
                     "n_used (docs/sequential.md); `n` below is the range of copies used")
    if summary:
        lines.append(f"- aggregated: {summary.get('created_at', '?')}, "
                     f"{summary.get('images', '?')} images from {summary.get('files', '?')} "
                     "vote files")
    lines.append("")
    if missing_parts:
        total = sum(p["missing"] for p in missing_parts)
        lines.append(f"> **Partial results: {total} expected image(s) have no votes.** "
                     "Accuracy is over the images that do:")
        for p in missing_parts:
            lines.append(f"> - sigma={p['sigma']:g}, {p['method']}: {p['images']} of "
                         f"{p['expected']} images ({p['missing']} missing)")
        lines.append("")

    quarantined = read_errors(run).select(["sigma", "method", "image_id", "error_type", "error"]).to_pylist()
    per_part = quarantined_counts(run)
    if quarantined:
        lines.append(f"> **{len(quarantined)} image(s) quarantined** (on_bad_input: quarantine): not certified, "
                     "not counted in the accuracy below; `densepure sql OUT \"SELECT * FROM errors\"` lists them:")
        for q in quarantined[:20]:
            first_line = q["error"].splitlines()[0] if q["error"] else ""
            lines.append(f"> - sigma={q['sigma']:g}, {q['method']}: `{q['image_id']}`: {q['error_type']}: {first_line}")
        if len(quarantined) > 20:
            lines.append(f"> - ... and {len(quarantined) - 20} more")
        lines.append("")

    radii, table = _pivot(acc_rows)
    radii = radii or list(REPORT_RADII)
    # Partitions without certificates (every image quarantined, or none voted) stay in the
    # tables with 0 images: they used to vanish, as if the method had never been run.
    empty = sorted((set(expected) | set(per_part)) - set(abst))
    table = sorted(table + [(s, m, 0, [None] * len(radii)) for s, m in empty])
    lines += ["## Certified accuracy (%)", ""]
    lines.append(markdown_table(
        ["sigma", "method", "images"] + [f"r = {r:g}" for r in radii],
        [[f"{s:g}", m, str(n)] + [_pct(a) for a in accs] for s, m, n, accs in table],
        "rlr" + "r" * len(radii)))
    lines += ["", "Certified accuracy at radius r: the share of labeled images that CERTIFY "
              "classifies correctly with a certified L2 radius of at least r (abstentions count "
              "as wrong). Finer radii: `tables/accuracy.parquet`.", ""]

    lines += ["## Images and cost", ""]
    rows = []
    for (s, m), (images, abstained) in sorted({**abst, **{k: (0, 0) for k in empty}}.items()):
        exp = expected.get((s, m), {})
        c = cost.get((s, m))
        rows.append([
            f"{s:g}", m, str(images), _num(exp.get("expected"), "d"), str(exp.get("missing", 0)),
            str(per_part.get((s, m), 0)),
            f"{100.0 * abstained / images:.1f}" if images else "-",
            _range(c[1], c[2]) if c else "-", _range(c[3], c[4]) if c else "-",
            _range(c[5], c[6]) if c else "-", _range(c[7], c[8]) if c else "-",
            _human(c[10]) if c else "-", _human(c[11]) if c else "-",
            _human(c[12]) if c else "-", _human(c[13]) if c else "-",
        ])
    lines.append(markdown_table(
        ["sigma", "method", "images", "expected", "missing", "quarantined", "abstained (%)", "n0",
         "n", "K", "S", "UNet calls / image", "classifier calls / image", "seconds / image",
         "total seconds"], rows, "rlrrrrrrrrrrrrr"))
    lines += ["", "Calls and seconds are means over the images' vote rows (`votes`); K = votes "
              "per noisy copy, S = reverse steps.", ""]
    lines += ["## Certified accuracy vs radius", "", "![certified accuracy vs radius]"
              "(certified_accuracy.png)", ""]
    markdown = "\n".join(lines)

    run.write_bytes(run.plot_uri, _plot(curves, title or "Certified accuracy"))
    run.write_bytes(run.report_uri, markdown.encode("utf-8"))
    return markdown


def _range(lo: Any, hi: Any) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _curves(con) -> dict[tuple[float, str], tuple[np.ndarray, np.ndarray]]:
    """Per (sigma, method): radius grid and certified accuracy on it, from certificates."""
    data = con.sql("""
        SELECT sigma, method, radius FROM certificates WHERE correct
        ORDER BY sigma, method, radius""").fetchnumpy()
    totals = dict(((s, m), n) for s, m, n in con.sql(
        "SELECT sigma, method, count(correct) FROM certificates GROUP BY ALL").fetchall())
    top = float(data["radius"].max()) if len(data["radius"]) else 1.0
    grid = np.linspace(0.0, max(top, 0.25) * 1.05, 400)
    curves = {}
    sig, meth, rad = data["sigma"], np.asarray(data["method"], dtype=object), data["radius"]
    for key, labeled in sorted(totals.items()):
        if not labeled:
            continue
        sel = np.sort(rad[(sig == key[0]) & (meth == key[1])])
        # correct and radius >= r, counted with a binary search on the sorted radii
        hits = sel.size - np.searchsorted(sel, grid, side="left")
        curves[key] = (grid, hits / labeled)
    return curves


def _plot(curves, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        # one colour per sigma, one line style per method, so overlapping curves stay legible
        sigmas = sorted({s for s, _ in curves})
        methods = sorted({m for _, m in curves})
        styles = ["-", "--", ":", "-."]
        for (sigma, method), (grid, acc) in curves.items():
            ax.plot(grid, acc, label=f"{method}, $\\sigma$ = {sigma:g}", drawstyle="steps-post",
                    color=f"C{sigmas.index(sigma) % 10}",
                    linestyle=styles[methods.index(method) % len(styles)])
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(left=0.0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend()
        buf = io.BytesIO()
        # No timestamps in the metadata, so re-running the report gives the same bytes.
        fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# TSV export
# ------------------------------------------------------------------------------------------

def export_tsv(out: RunDir | str, dest: str | None = None) -> list[str]:
    """Write Cohen-style result files, one per (sigma, method); return their URIs.

    Each file starts with the header ``idx label predict radius correct time`` (tabs) and has
    one line per image, formatted as Cohen et al.'s certify.py does
    (``"{}\\t{}\\t{}\\t{:.3}\\t{}\\t{}"``): idx = image_id, label (-1 unknown), predict
    (-1 abstain), radius with 3 significant digits, correct as 0/1 (0 for unknown labels),
    time = the image's vote seconds as ``str(datetime.timedelta(seconds=...))``
    (e.g. ``0:00:01.500000``). Lines are sorted by image_id. Cohen's ``analyze.py`` reads these
    files unchanged.

    Args:
        out: the OUT (a :class:`RunDir` or its root, local or ``s3://``), with published tables and the votes.
        dest: destination directory (local or ``s3://``); default ``OUT/tsv``.

    Returns:
        The URIs written, sorted by (sigma, method).

    Raises:
        ReportError: tables not published, or an image_id contains a tab or newline (the TSV
            would be unreadable).
    """
    run = RunDir.of(out)
    job = run.job()
    if job not in (None, "certify"):
        what, view = (("an attack evaluation", "attacks") if job == "attack" else
                      ("an ADDT training run", "train_metrics"))
        raise ReportError(f"{run} holds {what} (densepure {job}), not a certification: export-tsv writes "
                          f"Cohen-style certification files. Its rows are in SQL: densepure sql {run} "
                          f"\"SELECT * FROM {view}\" --format csv; its report: densepure report {run}")
    _require_tables(run)
    dest = dest or run.tsv_dir
    con = connect(run)
    try:
        has_votes = has_view(con, "votes")
        if not has_votes:
            raise ReportError(f"no vote files under {run.votes_dir}: the TSV 'time' "
                              "column comes from the votes")
        bad = con.sql(r"""
            SELECT image_id FROM certificates
            WHERE contains(image_id, chr(9)) OR contains(image_id, chr(10))
               OR contains(image_id, chr(13)) LIMIT 3""").fetchall()
        if bad:
            raise ReportError(f"image ids {[b[0] for b in bad]} contain a tab or newline and "
                              "cannot be written to a TSV; export with run_query(..., fmt='csv')")
        keys = con.sql("SELECT DISTINCT sigma, method FROM certificates "
                       "ORDER BY sigma, method").fetchall()
        written = []
        for sigma, method in keys:
            data = con.execute("""
                SELECT c.image_id, c.label, c.prediction, c.radius, coalesce(c.correct, false),
                       v.seconds
                FROM certificates c
                LEFT JOIN votes v
                       ON v.sigma = c.sigma AND v.method = c.method AND v.image_id = c.image_id
                WHERE c.sigma = ? AND c.method = ?
                ORDER BY c.image_id""", [sigma, method]).fetchall()
            lines = [TSV_HEADER]
            for image_id, label, pred, radius, correct, seconds in data:
                elapsed = "" if seconds is None else str(_dt.timedelta(seconds=seconds))
                lines.append("{}\t{}\t{}\t{:.3}\t{}\t{}".format(
                    image_id, label, pred, radius, int(correct), elapsed))
            uri = storage.join(dest, tsv_name(sigma, method))
            storage.write_bytes_atomic(uri, ("\n".join(lines) + "\n").encode("utf-8"))
            written.append(uri)
    finally:
        con.close()
    return written
