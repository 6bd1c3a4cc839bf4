"""``factory costs report``: an HTML page with PNG charts (matplotlib, Agg) of costs by tenant, day, resource.

Estimated figures (rows with records whose edges the meter estimated, ``UsageRecord.estimated``) are marked
``~`` here and in ``factory costs``'s table (:func:`mark_estimated`), with :func:`estimated_note` below.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from aifactory.cost.kpis import cost_rows, kpis


ESTIMATED_MARK = "~"


def mark_estimated(rows: list[dict]) -> list[dict]:
    """Rows for display: an estimated row's ``cost_usd`` is marked ``~`` and its estimated share shown in
    ``estimated_usd``; rows of a report with nothing estimated lose both flag columns. Pure."""
    any_estimated = any(r.get("estimated") for r in rows)
    out = []
    for r in rows:
        r = dict(r)
        flag, part = r.pop("estimated", False), r.pop("estimated_usd", 0.0)
        if any_estimated:
            r["cost_usd"] = f"{ESTIMATED_MARK}{r['cost_usd']}" if flag else r["cost_usd"]
            r["estimated_usd"] = part if flag else None
        out.append(r)
    return out


def estimated_note(rows: list[dict]) -> str | None:
    """The footnote of a table with estimated rows (None: nothing estimated)."""
    n = sum(1 for r in rows if r.get("estimated"))
    if not n:
        return None
    usd = sum(float(r.get("estimated_usd") or 0.0) for r in rows)
    return (f"{ESTIMATED_MARK} estimated: {n} row(s) include ${usd:.6f} from usage whose start/end the meter "
            "estimated (Ray's GCS actor table was unavailable); see `--format json` (estimated, estimated_usd)")


def _bar(path: Path, labels: list[str], values: list[float], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, values, color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no data)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('-' if r[c] is None else str(r[c]))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(out_dir: str | Path, *, ledger, book, since: float | None = None, tenant: str | None = None) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = ledger.usage(since=since, tenant=tenant)
    by_tenant = cost_rows(records, book, by="tenant")
    by_day = sorted(cost_rows(records, book, by="day"), key=lambda r: (r["day"], r["tenant"]))
    by_resource = cost_rows(records, book, by="resource")
    k = kpis(records, book, serve_usage=ledger.serve_usage(since=since, tenant=tenant),
             events=ledger.events(since=since, tenant=tenant))
    _bar(out / "cost_by_tenant.png", [r["tenant"] for r in by_tenant], [r["cost_usd"] for r in by_tenant],
         "Cost by tenant (idle and unattributed included)", "USD")
    days: dict[str, float] = {}
    for r in by_day:
        days[r["day"]] = days.get(r["day"], 0.0) + r["cost_usd"]
    _bar(out / "cost_by_day.png", list(days), list(days.values()), "Cost by day (UTC)", "USD")
    _bar(out / "cpu_seconds_by_tenant.png", [r["tenant"] for r in by_tenant], [r["cpu_s"] for r in by_tenant],
         "Allocated CPU-seconds by tenant", "CPU-s")
    total = sum(r["cost_usd"] for r in by_tenant)
    note = estimated_note(by_tenant)
    by_tenant, by_day, by_resource = (mark_estimated(rows) for rows in (by_tenant, by_day, by_resource))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>aifactory costs</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>aifactory: per-tenant costs</h1>
<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; price book {html.escape(book.version)};
{len(records)} ledger records; total ${total:.6f}{' for tenant ' + html.escape(tenant) if tenant else ''}.</p>
{f"<p><b>{html.escape(note)}</b></p>" if note else ""}
<h2>By tenant</h2><img src="cost_by_tenant.png" alt="cost by tenant">{_table(by_tenant)}
<h2>By day</h2><img src="cost_by_day.png" alt="cost by day">{_table(by_day)}
<h2>By resource</h2><img src="cpu_seconds_by_tenant.png" alt="CPU-seconds by tenant">{_table(by_resource)}
<h2>KPIs</h2>{_table(k)}
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
