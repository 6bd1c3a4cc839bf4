"""The HTML report of a ``factory run``: stages, the loss curve, the latency histogram and cost by tenant.

:func:`collect` gathers the figures the stages measured (their summaries, the training run's manifest);
:func:`write_report` turns them into ``report.html`` with PNG charts beside it (matplotlib, Agg) and a
``summary.json`` of the same figures. A chart whose figures are missing (a stage failed or was skipped) is
replaced by a line that says so, never drawn empty.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_STATUS_COLOURS = {"ok": "#2e7d32", "failed": "#c62828", "skipped": "#9e9e9e"}


@dataclass
class ReportData:
    """Everything the report shows; plain values, so a test can build one from figures it measured."""

    title: str
    stages: list[dict[str, Any]] = field(default_factory=list)  # name, status, seconds, result
    loss_curve: list[dict[str, Any]] = field(default_factory=list)  # step, train_loss, val_loss
    latencies_ms: list[float] = field(default_factory=list)  # each successful request of the serve burst
    cost_rows: list[dict[str, Any]] = field(default_factory=list)  # tenant, cost_usd, cpu_s, ...
    facts: dict[str, str] = field(default_factory=dict)  # tenant, home, code version, log path ...


def collect(outcomes: Sequence, ctx, *, title: str, facts: dict[str, str] | None = None) -> ReportData:
    """The report's figures from a run's stage outcomes and what the stages wrote under the home."""
    from aifactory.exceptions import FactoryError
    from aifactory.train import runs

    data = ReportData(title=title, facts=dict(facts or {}))
    by_name = {}
    for o in outcomes:
        summary = o.result.summary if o.result else {}
        by_name[o.stage.name] = summary
        data.stages.append({
            "name": o.stage.name, "status": o.status, "seconds": round(o.seconds, 1),
            "result": "; ".join(f"{k}={v}" for k, v in summary.items() if not k.startswith("_")) or (o.error or ""),
        })
    run_id = ctx.artifacts.get("run_id")
    if run_id:
        try:
            curve = (runs.read_manifest(ctx.home, run_id).get("metrics") or {}).get("val_curve") or []
        except FactoryError:
            curve = []
        data.loss_curve = [{"step": e["step"], "train_loss": e.get("train_loss"), "val_loss": e.get("val_loss")}
                           for e in curve]
    data.latencies_ms = list((by_name.get("serve") or {}).get("_latencies_ms") or [])
    data.cost_rows = list((by_name.get("costs") or {}).get("_table") or [])
    return data


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _stages_chart(path: Path, stages: list[dict[str, Any]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(stages) + 1.2))
    names = [s["name"] for s in stages][::-1]
    secs = [s["seconds"] for s in stages][::-1]
    colours = [_STATUS_COLOURS.get(s["status"], "#1565c0") for s in stages][::-1]
    ax.barh(names, secs, color=colours)
    for y, (sec, s) in enumerate(zip(secs, stages[::-1])):
        ax.text(sec, y, f" {sec:.1f}s {s['status']}", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("stages: duration and outcome")
    ax.set_xlim(0, max(secs + [1.0]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_chart(path: Path, curve: list[dict[str, Any]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [e["step"] for e in curve]
    for key, label, marker in (("train_loss", "train (mean since the last checkpoint)", "o"),
                               ("val_loss", "validation", "s")):
        pts = [(s, e[key]) for s, e in zip(steps, curve) if e.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss at each checkpoint")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency_chart(path: Path, latencies_ms: list[float]) -> None:
    from aifactory.bench.stats import percentile

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(latencies_ms, bins=min(30, max(5, len(latencies_ms) // 4)), color="#1565c0", alpha=0.85)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        v = percentile(latencies_ms, q)
        ax.axvline(v, color="#c62828", linestyle=style, label=f"p{q} {v:.0f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"serve burst: latency of {len(latencies_ms)} successful requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cost_chart(path: Path, rows: list[dict[str, Any]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [str(r["tenant"]) for r in rows][::-1]
    costs = [float(r["cost_usd"]) for r in rows][::-1]
    ax.barh(names, costs, color="#6a1b9a")
    for y, c in enumerate(costs):
        ax.text(c, y, f" ${c:.6f}", va="center", fontsize=8)
    ax.set_xlabel("cost (USD, from the price book)")
    ax.set_title("cost by tenant")
    ax.set_xlim(0, max(costs + [1e-9]) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write ``report.html``, its PNG charts and ``summary.json`` into ``out_dir``; return the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str | None, str]] = []  # (heading, image file or None, text)
    charts = (
        ("Stages", "stages.png", data.stages, _stages_chart, "no stage ran"),
        ("Loss curve", "loss.png", data.loss_curve, _loss_chart, "no training curve (the train stage did not finish)"),
        ("Latency", "latency.png", data.latencies_ms, _latency_chart,
         "no latencies (the serve stage did not finish)"),
        ("Cost by tenant", "cost_by_tenant.png", data.cost_rows, _cost_chart,
         "no cost rows (the costs stage did not finish)"),
    )
    for heading, name, values, draw, missing in charts:
        if values:
            draw(out / name, values)
            sections.append((heading, name, ""))
        else:
            (out / name).unlink(missing_ok=True)  # a chart of an earlier run in this folder would mislead
            sections.append((heading, None, f"unavailable: {missing}"))
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in data.facts.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(data.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;"
        "text-align:left;font-size:.9em}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
        f"<table>{facts}</table>",
        "<h2>Stages</h2>", _table(data.stages),
    ]
    for heading, image, text in sections:
        if heading != "Stages":
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(f"<p><img src='{image}' alt='{html.escape(heading)}'></p>" if image else
                     f"<p><em>{html.escape(text)}</em></p>")
        if heading == "Cost by tenant" and data.cost_rows:
            parts.append(_table(data.cost_rows))
    parts.append(f"<p><small>written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</small></p></body></html>")
    path = out / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(asdict(data), indent=2, default=str), encoding="utf-8")
    return path
