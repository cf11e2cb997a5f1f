"""The SQL of the attack summary: a leaf of the stage layer (no tasks imports).

:data:`SUMMARY_SQL` backs both the ``attack_summary`` view of ``densepure sql``
(tasks/attack/views.py) and the published ``OUT/tables/attack_summary.parquet``
(tasks/attack/summary.py). It needs the ``wilson_low``/``wilson_high`` UDFs of tasks/common/sqlfuncs.py.
"""

from __future__ import annotations

__all__ = ["CONFIDENCE", "SUMMARY_RULES", "SUMMARY_SQL"]

CONFIDENCE = 0.95

# (rule, clean, robust, rows): the last-iterate rules over the M scoring purifications, then
# DiffBreak's any-iterate rules over M' fresh purifications per checked point (rows that ran it):
# robust when no point broke the image, clean when point 0 (the clean image) did not.
_RULE_COLUMNS = (
    ("mean", "clean_mean", "adv_mean", "TRUE"),
    ("majority", "clean_majority", "adv_majority", "TRUE"),
    ("worst", "clean_worst", "adv_worst", "TRUE"),
    ("majority_any", "broken_at_majority <> 0", "broken_at_majority = -1", "broken_at_majority IS NOT NULL"),
    ("worst_any", "broken_at_worst <> 0", "broken_at_worst = -1", "broken_at_worst IS NOT NULL"),
)
#: The rules of the summary, in order: last iterate (M), then any iterate (M', DiffBreak).
SUMMARY_RULES = tuple(r[0] for r in _RULE_COLUMNS)

SUMMARY_SQL = f"""
WITH per_rule AS (
    {" UNION ALL ".join(
        f"SELECT run_id, defense, threat, norm, eps, attack, '{rule}' AS rule, {i} AS rule_order, "
        f"CAST({c} AS DOUBLE) AS clean, CAST({a} AS DOUBLE) AS robust, gradient_calls, unet_calls, seconds "
        f"FROM attacks WHERE {where}" for i, (rule, c, a, where) in enumerate(_RULE_COLUMNS))}
)
SELECT run_id, defense, threat, attack, rule, count(*) AS images,
       avg(clean) AS clean_accuracy,
       wilson_low(sum(clean), count(*), {CONFIDENCE}) AS clean_low,
       wilson_high(sum(clean), count(*), {CONFIDENCE}) AS clean_high,
       avg(robust) AS robust_accuracy,
       wilson_low(sum(robust), count(*), {CONFIDENCE}) AS robust_low,
       wilson_high(sum(robust), count(*), {CONFIDENCE}) AS robust_high,
       {CONFIDENCE} AS confidence,
       avg(gradient_calls) AS gradient_calls, avg(unet_calls) AS unet_calls, avg(seconds) AS seconds
FROM per_rule
GROUP BY run_id, defense, threat, attack, rule, rule_order
-- threats by norm and radius (linf-8 before linf-32), not by their labels' text
ORDER BY run_id, defense, min(norm), min(eps), threat, attack, rule_order
"""
"""The ``attack_summary`` query over a view ``attacks`` (needs the UDFs of tasks.common.sqlfuncs)."""
