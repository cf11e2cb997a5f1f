"""Stage 3's checks: the evidence is refused before anything is published.

:func:`check_votes` runs on the compact ``base`` table that :func:`tasks.certify.aggregate.build_tables`
creates (one row per image, see ``_BASE_SQL`` in :mod:`tasks.certify.aggregate_sql`): no image counted
twice, one run and one config per (sigma, method), counts that add up, each file in the
partition its directory names; ``_apply_expected`` then compares the images found with the ones
the plan promised. Each failure is an :class:`AggregateError` naming the data and the fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import duckdb

from densepure_core.certification import sequential
from tasks.common.layout import names, parse_vote_path

__all__ = [
    "AggregateError",
    "PartitionSummary",
    "check_votes",
]

_SHOWN = 10  # offending rows fetched for an error message (tasks.common.layout.names shows 10)


class AggregateError(ValueError):
    """The votes cannot be published as they are; the message names the data and the fix."""


@dataclass(frozen=True)
class PartitionSummary:
    """What one (sigma, method) partition holds.

    Attributes:
        sigma: the smoothing noise level.
        method: the method's name.
        run_id: the single run the partition's votes belong to.
        config_hash: the single config they were voted with.
        num_classes: the length of the count lists.
        images: images with votes.
        labeled: images with a known label (the accuracy denominator).
        abstained: images CERTIFY abstained on (0 until certificates are computed).
        expected: images the caller expected, or None when not given.
        missing: ``expected - images`` (0 when not given).
        quarantined: images recorded in the errors table instead (on_bad_input: quarantine);
            a partition whose every image was quarantined has images = 0 and is still listed.
    """

    sigma: float
    method: str
    run_id: str
    config_hash: str
    num_classes: int
    images: int
    labeled: int
    abstained: int = 0
    expected: int | None = None
    missing: int = 0
    quarantined: int = 0


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------

# name -> (what is wrong, SQL condition on the base relation that finds the offending rows)
_CONTRACT_CHECKS: dict[str, tuple[str, str]] = {
    "nulls": ("rows with a NULL in a required column",
              "run_id IS NULL OR config_hash IS NULL OR image_id IS NULL OR label IS NULL"
              " OR sigma IS NULL OR method IS NULL OR classes0 IS NULL OR classes IS NULL"
              " OR n0 IS NULL OR n_column IS NULL"),
    "bad_length": ("rows whose counts0 and counts are empty or differ in length",
                   "classes0 = 0 OR classes0 <> classes"),
    "negative": ("rows with a negative count", "min_count < 0"),
    "bad_sum": ("rows whose counts0 do not sum to n0 or counts to n (or sum to 0)",
                "sum0 <> n0 OR n <> n_column OR sum0 = 0 OR n = 0"),
    "bad_label": ("rows whose label is neither -1 nor a class index",
                  "label < -1 OR label >= classes0"),
    "bad_sigma": ("rows whose sigma is not a finite positive number",
                  "NOT (sigma > 0) OR isinf(sigma)"),
    # fixed rows: n_used = n = n_max and Clopper-Pearson; adaptive rows: n_used = n <= n_max and
    # an anytime-valid bound (never Clopper-Pearson at a data-dependent n)
    "bad_sampling": ("rows whose sampling, n_used, n_max or bound disagree (docs/schema.md)",
                     "sampling NOT IN ('fixed', 'adaptive') OR n_used <> n OR n_max < n_used"
                     f" OR (sampling = 'fixed' AND (bound <> '{sequential.FIXED_BOUND}' OR n_max <> n))"
                     " OR (sampling = 'adaptive' AND bound NOT IN ("
                     + ", ".join(f"'{b}'" for b in sequential.BOUNDS) + "))"),
}


def _check_bound_params(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """Every adaptive row's bound parameters are valid JSON that the bound accepts at its n_used
    (a staged bound only at one of its looks), so certificates never fail half-way."""
    bad = []
    for bound, params, used in con.sql(
            f"SELECT bound, bound_params, list(DISTINCT n_used) FROM {source} "
            "WHERE sampling = 'adaptive' GROUP BY ALL ORDER BY ALL").fetchall():
        try:
            sequential.anytime_lower_bound(0, used, 0.5, bound, **json.loads(params))
        except (ValueError, TypeError) as exc:
            bad.append(f"bound={bound} bound_params={params}: {exc}")
    if bad:
        raise AggregateError(
            f"the vote files break the data contract (docs/schema.md): adaptive rows whose bound "
            f"cannot be evaluated: {names(bad)}. Re-vote those shards (delete the files and resume "
            "the run).")


def check_votes(con: duckdb.DuckDBPyConnection, source: str = "base") -> list[PartitionSummary]:
    """Refuse evidence that would give a wrong table; summarize the partitions.

    Checks, each failing with an :class:`AggregateError` that names the rows or files:
    every image appears once per (sigma, method) (a duplicate would be counted twice); each
    partition holds one run_id, one config_hash and one number of classes; count lists are
    non-empty, non-negative, of equal length, and sum to n0 and n; labels are -1 or a class;
    each file's sigma/method columns match its directory.

    Args:
        con: a connection where ``source`` exists (see :func:`build_tables`).
        source: relation with the columns of ``_BASE_SQL`` plus ``filename``.

    Returns:
        One :class:`PartitionSummary` per (sigma, method), sorted.
    """
    counts = con.sql("SELECT " + ", ".join(
        f"count(*) FILTER (WHERE {cond})" for _, cond in _CONTRACT_CHECKS.values())
        + f" FROM {source}").fetchall()[0]
    found = [(name, n) for name, n in zip(_CONTRACT_CHECKS, counts) if n]
    if found:
        what, cond = _CONTRACT_CHECKS[found[0][0]]
        examples = con.sql(f"SELECT DISTINCT filename FROM {source} WHERE {cond} "
                           f"ORDER BY filename LIMIT {_SHOWN}").fetchall()
        summary = "; ".join(f"{n} {_CONTRACT_CHECKS[name][0]}" for name, n in found)
        raise AggregateError(
            f"the vote files break the data contract (docs/schema.md): {summary}. First files "
            f"with {what}: {names([e[0] for e in examples])}. Re-vote those shards "
            "(delete the files and resume the run); the vote stage must write tasks.common.layout.VOTES_SCHEMA.")

    _check_bound_params(con, source)

    # Directory names are for people and pruning; the columns decide. They must agree, or a
    # file was copied into the wrong partition.
    misplaced = []
    for fname, sigmas, methods in con.sql(
            f"SELECT filename, list(DISTINCT sigma), list(DISTINCT method) FROM {source} "
            "GROUP BY filename ORDER BY filename").fetchall():
        m = parse_vote_path(fname)
        try:
            dir_sigma = float(m[0]) if m else math.nan
        except ValueError:
            dir_sigma = math.nan
        if not m or sigmas != [dir_sigma] or methods != [m[1]]:
            misplaced.append(f"{fname} (holds sigma={sigmas} method={methods})")
    if misplaced:
        raise AggregateError(
            f"{len(misplaced)} vote file(s) hold rows of another partition than their "
            f"directory says: {names(misplaced)}. Move each file to "
            "votes/sigma=<repr(float(sigma))>/method=<method>/ or re-vote it.")

    dup_count, = con.sql(f"""
        SELECT count(*) FROM (SELECT 1 FROM {source} GROUP BY sigma, method, image_id
                              HAVING count(*) > 1)""").fetchall()[0]
    if dup_count:
        dups = con.sql(f"""
            SELECT sigma, method, image_id, count(*) AS copies,
                   list(DISTINCT filename ORDER BY filename)
            FROM {source} GROUP BY sigma, method, image_id HAVING count(*) > 1
            ORDER BY sigma, method, image_id LIMIT {_SHOWN}""").fetchall()
        shown = [f"sigma={s!r} method={m} image_id={i!r} x{c} in {files}"
                 for s, m, i, c, files in dups]
        raise AggregateError(
            f"{dup_count} image(s) have more than one vote row in the same (sigma, method); an "
            f"image must never be counted twice: {names(shown, total=dup_count)}. Remove the "
            "duplicated shard files (keep one row per image) and aggregate again.")

    parts = con.sql(f"""
        SELECT sigma, method, list(DISTINCT run_id ORDER BY run_id),
               list(DISTINCT config_hash ORDER BY config_hash),
               list(DISTINCT classes0 ORDER BY classes0), count(*),
               count(*) FILTER (WHERE label >= 0),
               -- NULL: a file written before fingerprints were recorded (unknown, not another model)
               list(DISTINCT classifier_fingerprint ORDER BY classifier_fingerprint)
                   FILTER (WHERE classifier_fingerprint IS NOT NULL),
               list(DISTINCT diffusion_fingerprint ORDER BY diffusion_fingerprint)
                   FILTER (WHERE diffusion_fingerprint IS NOT NULL)
        FROM {source} GROUP BY sigma, method ORDER BY sigma, method""").fetchall()
    out = []
    for sigma, method, runs, hashes, classes, images, labeled, clf_fps, diff_fps in parts:
        for what, values in (("classifier fingerprint", clf_fps), ("diffusion model fingerprint", diff_fps)):
            if values and len(values) > 1:
                files = con.sql(f"""
                    SELECT DISTINCT filename FROM {source} WHERE sigma = ? AND method = ?
                    ORDER BY filename LIMIT {_SHOWN}""", params=[sigma, method]).fetchall()
                raise AggregateError(
                    f"partition sigma={sigma!r} method={method} was voted by {len(values)} different models "
                    f"({what}s {values}); votes of different models are never pooled. Its files: "
                    f"{names([f[0] for f in files])}. Certify into a new --out, or delete the shards of "
                    f"the model you do not want and rerun with it.")
        for what, values in (("run_id", runs), ("config_hash", hashes),
                             ("number of classes", classes)):
            if len(values) > 1:
                files = con.sql(f"""
                    SELECT {'run_id' if what == 'run_id' else 'config_hash'}, list(DISTINCT filename ORDER BY filename)
                    FROM {source} WHERE sigma = ? AND method = ? GROUP BY ALL ORDER BY ALL""",
                                params=[sigma, method]).fetchall() if what != "number of classes" else []
                shown = "; ".join(f"{v}: {names(fs)}" for v, fs in files)
                repair = (" If two runs were started on this OUT at once, `densepure repair OUT` keeps the "
                          "shards of the run that run.json names and removes the others (they are voted "
                          "again on the next run)." if what == "run_id" else "")
                raise AggregateError(
                    f"partition sigma={sigma!r} method={method} mixes {len(values)} values of "
                    f"{what}: {values}" + (f" (by file: {shown})" if shown else "") + ". Votes of different "
                    "runs or configs must never be pooled: delete the stale shards (or aggregate into a "
                    "fresh OUT) and re-vote." + repair)
        out.append(PartitionSummary(sigma=float(sigma), method=method, run_id=runs[0],
                                    config_hash=hashes[0], num_classes=int(classes[0]),
                                    images=int(images), labeled=int(labeled)))
    return out


def _apply_expected(parts: list[PartitionSummary],
                    expected: Mapping[tuple[float, str], int] | None,
                    allow_partial: bool) -> list[PartitionSummary]:
    """Count what was expected against what exists; refuse or annotate the shortfall."""
    if not expected:
        return parts
    want = {}
    for key, count in expected.items():
        try:
            sigma, method = key
            want[(float(sigma), str(method))] = int(count)
        except (TypeError, ValueError):
            raise AggregateError(f"expected must map (sigma, method) to an image count, got "
                                 f"{key!r}: {count!r}") from None
    by_key = {(p.sigma, p.method): p for p in parts}
    over, short, result = [], [], []
    for p in parts:
        exp = want.get((p.sigma, p.method))
        if exp is None:  # partitions the caller did not mention are not checked
            result.append(p)
            continue
        if p.images > exp:
            over.append(f"sigma={p.sigma!r} method={p.method}: {p.images} images, {exp} expected")
        missing = max(exp - p.images, 0)
        if missing:
            short.append(f"sigma={p.sigma!r} method={p.method}: {p.images} of {exp} images "
                         f"({missing} missing)")
        result.append(replace(p, expected=exp, missing=missing))
    for (sigma, method), exp in sorted(want.items()):
        if (sigma, method) in by_key:
            continue
        if exp > 0:
            short.append(f"sigma={sigma!r} method={method}: 0 of {exp} images ({exp} missing)")
        # Expected 0 (every image quarantined) stays a partition of the tables, with 0 images:
        # it used to vanish from summary.json and the report.
        result.append(PartitionSummary(sigma=sigma, method=method, run_id="", config_hash="",
                                       num_classes=0, images=0, labeled=0, expected=exp, missing=exp))
    if over:
        raise AggregateError(
            f"more images than expected: {'; '.join(over)}. The votes do not belong to this "
            "plan: check OUT and the expected counts (allow_partial does not cover this).")
    if short and not allow_partial:
        raise AggregateError(
            f"refusing to publish accuracy over fewer images than expected: {'; '.join(short)}. "
            "Resume the run to vote the missing shards, or pass allow_partial=True "
            "(--allow-partial) to publish a table that says how many images are missing.")
    return sorted(result, key=lambda p: (p.sigma, p.method))


def _apply_quarantined(parts: list[PartitionSummary],
                       quarantined: Mapping[tuple[float, str], int] | None) -> list[PartitionSummary]:
    """Record each partition's quarantined images; a partition with quarantined images only
    (no votes, not in ``expected``) is added with 0 images, so it is never dropped."""
    if not quarantined:
        return parts
    counts = {(float(s), str(m)): int(n) for (s, m), n in quarantined.items()}
    by_key = {(p.sigma, p.method): p for p in parts}
    for key in counts.keys() - by_key.keys():
        by_key[key] = PartitionSummary(sigma=key[0], method=key[1], run_id="", config_hash="",
                                       num_classes=0, images=0, labeled=0)
    return sorted((replace(p, quarantined=counts.get(k, 0)) for k, p in by_key.items()),
                  key=lambda p: (p.sigma, p.method))
