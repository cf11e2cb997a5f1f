"""Text formatting of query results: aligned text tables, CSV and JSON cells.

Used by :func:`tasks.query.run_query` (the ``densepure sql`` output) and tasks/certify/report.py (the
accuracy table the CLI prints). Pure Python: a leaf of the stage layer, no tasks imports.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["FORMATS", "format_rows", "text_table", "markdown_table"]

FORMATS = ("table", "csv", "json")


def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table") -> str:
    """Format query results as an aligned text table, CSV or JSON.

    - ``table``: columns separated by two spaces, a dashed rule under the header, numbers
      right-aligned, floats with 6 significant digits, NULL as ``NULL``, then ``(N rows)``.
    - ``csv``: a header line, then rows; floats in full precision (``repr``), NULL empty,
      booleans ``true``/``false``.
    - ``json``: an array of objects (one per row, keys in column order), indent 2; floats in
      full precision, NaN/inf as null, timestamps in ISO 8601.

    Args:
        columns: column names.
        rows: row tuples.
        fmt: one of :data:`FORMATS`.

    Returns:
        The text, without a trailing newline.
    """
    if fmt == "table":
        return text_table(columns, rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(v) for v in row])
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        records = [{c: _json_value(v) for c, v in zip(columns, row)} for row in rows]
        return json.dumps(records, indent=2, ensure_ascii=False, allow_nan=False)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool)


def _text_cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    return str(v)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, footer: bool = True,
               align: str | None = None) -> str:
    """An aligned plain-text table (the ``table`` format of :func:`format_rows`).

    Args:
        columns: column names.
        rows: row tuples; numbers are right-aligned, floats shown with 6 significant digits,
            None as ``NULL``, strings used as they are.
        footer: end with a ``(N rows)`` line.
        align: one letter per column, ``l`` or ``r``; default: right for columns holding only
            numbers (and NULLs), left otherwise.

    Returns:
        The lines joined by newlines, without a trailing newline or trailing spaces.
    """
    cells = [[_text_cell(v) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    # A column is right-aligned when every non-NULL value in it is a number.
    if align is not None:
        if len(align) != len(columns) or set(align) - {"l", "r"}:
            raise ValueError(f"align must be one 'l' or 'r' per column ({len(columns)}), "
                             f"got {align!r}")
        right = [a == "r" for a in align]
    else:
        right = [bool(rows) and all(_is_number(r[i]) or r[i] is None for r in rows)
                 for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    if footer:
        out.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(out)


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    return str(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    return v


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A GitHub markdown table; ``align`` has one letter per column: ``r`` right, else left."""
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
