"""Output for people and for machines: a table on a terminal, JSON lines otherwise (or with ``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

Row = Mapping[str, Any]


def is_terminal(stream: TextIO) -> bool:
    return stream.isatty()


def wants_json(flag: bool, stream: TextIO | None = None) -> bool:
    """JSON when asked for, or when the output is not a terminal (a pipe, a file, a program)."""
    return flag or not is_terminal(stream or sys.stdout)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def table(rows: Iterable[Row], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Rows as aligned columns under a header line; numbers right-aligned."""
    rows = list(rows)
    heads = list(headers or columns)
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows) and rows
               for c in columns]  # fmt: skip
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(parts).rstrip()

    out = [line(heads), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def emit(
    rows: Iterable[Row],
    columns: Sequence[str],
    *,
    as_json: bool,
    headers: Sequence[str] | None = None,
    stream: TextIO | None = None,
    line: Callable[[Row], Row] | None = None,
) -> None:
    """Print ``rows``: one JSON object per line (``line(row)`` when given), or a table."""
    stream = stream or sys.stdout
    rows = list(rows)
    if as_json:
        for r in rows:
            print(json.dumps(line(r) if line else dict(r)), file=stream)
    else:
        print(table(rows, columns, headers), file=stream)
    stream.flush()
