"""Rendering for the CLI: tables, JSON, CSV, and one-line errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


_results = None


def results():
    """Where a command's result goes: stdout, even while :func:`results_only_on_stdout` diverts other output."""
    return _results or sys.stdout


@contextlib.contextmanager
def results_only_on_stdout(enabled: bool):
    """With ``--format json|csv`` stdout must parse: anything else printed meanwhile (Ray forwards worker and
    raylet logs to the driver's ``sys.stdout``) goes to stderr, and only the result goes to stdout."""
    global _results
    if not enabled:
        yield
        return
    _results, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout, _results = _results, None


def add_format(parser, *choices: str, default: str = "table") -> None:
    parser.add_argument(
        "--format", choices=choices or ("table", "json"), default=default, help="output format"
    )


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, file=None) -> None:
    """Print rows as an aligned text table (numbers right-aligned)."""
    file = file or sys.stdout
    if not rows:
        print("(none)", file=file)
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_num(r.get(c)) for r in rows) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=file)
    for row in cells:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)]
        print("  ".join(parts).rstrip(), file=file)


def emit(rows: Sequence[Mapping[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> None:
    if fmt == "json":
        print(json.dumps(list(rows), indent=2, default=str), file=results())
    elif fmt == "csv":
        buf = io.StringIO()
        cols = list(columns or (rows[0].keys() if rows else []))
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        print(buf.getvalue(), end="", file=results())
    else:
        table(rows, columns, file=results())


def emit_obj(obj: Mapping[str, Any], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(obj, indent=2, default=str), file=results())
    else:
        width = max((len(k) for k in obj), default=0)
        for k, v in obj.items():
            print(f"{k.ljust(width)}  {_fmt(v)}", file=results())


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or v is None


def progress(msg: str, *, file=None) -> None:
    print(msg, file=file or sys.stderr, flush=True)


def iter_lines(text: str) -> Iterable[str]:
    yield from text.splitlines()
