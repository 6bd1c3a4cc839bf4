"""A run's report: Markdown plus matplotlib PNGs; and the factory's one chart helper for benchmarks.

:func:`bar_chart` draws the per-variant bars (median, 95% CI as error bars) of any run, a sweep's or a
``benchmarks/`` script's.

Serving: latency (p50/p95/p99) vs throughput, cost per 1k requests vs p99, the Pareto front of
throughput vs p99 (and cost where priced), and the configuration recommended for the spec's SLO.
Training: time-to-quality per configuration (MLPerf aggregate and median with its CI), cost per
validated checkpoint vs time-to-quality, and the recommended configuration.
Figures that could not be measured are listed as unavailable with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aifactory.bench.analysis import (
    ConfigSummary, Recommendation, metrics_of, pareto_front, recommend_serving, recommend_training, summarize_configs,
)
from aifactory.bench.results import RunRecord, TrialRecord


@dataclass
class Report:
    markdown_path: Path
    images: list[Path]
    summaries: list[ConfigSummary]
    recommendation: Recommendation
    pareto: list[str]
    text: str = field(repr=False, default="")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "unavailable"
    return f"{x:.{digits}g}"


def _cell(s) -> str:
    if s is None or s.n == 0:
        return "unavailable"
    if s.ci_low is None:
        return f"{_fmt(s.median)} (n={s.n})"
    return f"{_fmt(s.median)} [{_fmt(s.ci_low)}, {_fmt(s.ci_high)}]"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _err(s) -> tuple[float, float]:
    if s.ci_low is None:
        return 0.0, 0.0
    return max(s.median - s.ci_low, 0.0), max(s.ci_high - s.median, 0.0)


def bar_chart(path: str | Path, title: str, summaries: list[ConfigSummary], metrics: list[tuple[str, str]]) -> Path:
    """One panel per ``(metric, label)``, one bar per configuration: the median over repeats, the 95% CI as
    error bars, the value annotated. A configuration without the metric gets no bar (not a zero)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2", "#937860", "#DA8BC3", "#8C8C8C"]
    for ax, (key, label) in zip(axes[0], metrics):
        have = [s for s in summaries if s.metrics.get(key) is not None and s.metrics[key].n]
        vals = [s.median(key) for s in have]
        yerr = list(zip(*[_err(s.metrics[key]) for s in have])) if have else None
        bars = ax.bar([s.config_id for s in have], vals, yerr=yerr, capsize=3,
                      color=[colors[i % len(colors)] for i in range(len(have))])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    fig.suptitle(title + " (median, bars: 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _serving_plots(summaries: list[ConfigSummary], out: Path, slo_p99_ms: float | None, front: list[str]) -> list[Path]:
    plt = _plt()
    pts = [s for s in summaries if s.median("throughput_rps") is not None and s.median("p99_ms") is not None]
    pts.sort(key=lambda s: s.median("throughput_rps"))
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^-.")):
        have = [s for s in pts if s.median(metric) is not None]  # an unmeasured percentile is left out
        if not have:
            continue
        yerr = list(zip(*[_err(s.metrics[metric]) for s in have]))
        ax.errorbar([s.median("throughput_rps") for s in have], [s.median(metric) for s in have], yerr=yerr,
                    fmt=style, capsize=3, label=metric.replace("_ms", ""))
    for s in pts:
        ax.annotate(s.config_id, (s.median("throughput_rps"), s.median("p99_ms")), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    if slo_p99_ms:
        ax.axhline(slo_p99_ms, color="red", lw=0.8, ls=":", label=f"SLO p99 {slo_p99_ms:g} ms")
    ax.set_xlabel("throughput (req/s, median of repeats)")
    ax.set_ylabel("latency (ms, median; bars: 95% CI)")
    ax.set_title("latency vs throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "latency_vs_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    costed = [s for s in pts if s.median("cost_per_1k_requests_usd") is not None]
    if costed:
        ax.scatter([s.median("p99_ms") for s in costed], [s.median("cost_per_1k_requests_usd") for s in costed])
        for s in costed:
            ax.annotate(s.config_id, (s.median("p99_ms"), s.median("cost_per_1k_requests_usd")), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        if slo_p99_ms:
            ax.axvline(slo_p99_ms, color="red", lw=0.8, ls=":", label=f"SLO p99 {slo_p99_ms:g} ms")
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "cost unavailable (no price book)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("cost per 1k requests (USD)")
    ax.set_title("cost per 1k requests vs p99")
    fig.tight_layout()
    paths.append(out / "cost_vs_p99.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    on = [s for s in pts if s.config_id in front]
    off = [s for s in pts if s.config_id not in front]
    ax.scatter([s.median("p99_ms") for s in off], [s.median("throughput_rps") for s in off], c="grey", label="dominated")
    on.sort(key=lambda s: s.median("p99_ms"))
    ax.plot([s.median("p99_ms") for s in on], [s.median("throughput_rps") for s in on], "o-", c="C2", label="Pareto front")
    for s in pts:
        ax.annotate(s.config_id, (s.median("p99_ms"), s.median("throughput_rps")), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("p99 latency (ms) - lower is better")
    ax.set_ylabel("throughput (req/s) - higher is better")
    ax.set_title("Pareto front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "pareto_front.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _training_plots(summaries: list[ConfigSummary], out: Path) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ids = [s.config_id for s in summaries]
    med = [s.median("time_to_quality_s") or 0.0 for s in summaries]
    yerr = list(zip(*[_err(s.metrics["time_to_quality_s"]) if s.metrics["time_to_quality_s"].n else (0, 0)
                      for s in summaries])) if summaries else None
    ax.bar(range(len(ids)), med, yerr=yerr, capsize=3, label="median [95% CI]")
    ax.scatter(range(len(ids)), [s.time_to_quality_mlperf_s or float("nan") for s in summaries], c="k", marker="x",
               label="MLPerf (drop best+worst)", zorder=3)
    ax.set_xticks(range(len(ids)), ids, rotation=20, fontsize=7)
    ax.set_ylabel("time to validation-loss target (s)")
    ax.set_title("time-to-quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "time_to_quality.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    return paths


def write_report(run: RunRecord, trials: list[TrialRecord], out_dir: str | Path, *,
                 slo_p99_ms: float | None = None, slo_time_to_quality_s: float | None = None) -> Report:
    """Write ``report.md`` and PNGs into ``out_dir``; the SLO defaults to the spec's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = "serving" if run.kind.startswith("serve") else "training"
    summaries = summarize_configs(trials, family=family, method=run.spec.get("ci_method", "t"))
    slo = run.spec.get("slo") or {}
    ctx = run.context
    hw = ctx.get("hardware", {})
    lines = [
        f"# Benchmark {run.run_id}", "",
        f"- spec: `{run.spec_name}` ({run.kind}), tenant `{run.tenant}/{run.project}`",
        f"- {run.num_trials} trials ({run.num_failed} failed), {len({t.config_id for t in trials})} configurations x "
        f"{run.spec.get('repeats')} repeats, {run.wall_s:.0f} s",
        f"- code `{ctx.get('code_version')}`, dataset `{ctx.get('dataset_version')}`, model `{ctx.get('model_version')}`",
        f"- hardware: {hw.get('cpu_model')} ({hw.get('cpu_cores')} cores, {hw.get('memory_gib')} GiB); GPU: "
        f"{hw.get('gpu_name')}{' - ' + hw['gpu_note'] if hw.get('gpu_note') else ''}",
        f"- region `{ctx.get('region')}`, at {ctx.get('timestamp_iso')}; runtime: "
        + ", ".join(f"{k}={v}" for k, v in sorted(ctx.get("runtime_flags", {}).items())),
        f"- pricing: price book {run.pricing.get('price_book_version') or 'unavailable'}"
        f" ({run.pricing.get('basis')}){'; ' + run.pricing['unavailable'] if run.pricing.get('unavailable') else ''}",
        "", "Cells: median over repeats [" + ("95% CI of the mean, Student t" if run.spec.get("ci_method", "t") == "t"
                                           else "95% percentile-bootstrap CI of the median") + "].", "",
    ]
    shown = [m for m in metrics_of(family)]
    lines.append("| configuration | ok | " + " | ".join(m.name for m in shown)
                 + (" | TTQ (MLPerf) |" if family == "training" else " |"))
    lines.append("|---" * (len(shown) + 2 + (family == "training")) + "|")
    for s in summaries:
        row = [s.config_id, f"{s.num_ok}/{s.num_ok + s.num_failed}"] + [_cell(s.metrics.get(m.name)) for m in shown]
        if family == "training":
            row.append(_fmt(s.time_to_quality_mlperf_s) if s.time_to_quality_mlperf_s is not None else "not reached")
        lines.append("| " + " | ".join(row) + " |")
    unavailable = sorted({(m, r) for s in summaries for m, r in s.unavailable.items()})
    if unavailable:
        lines += ["", "Unavailable figures (not measured, never estimated):"]
        lines += [f"- {m}: {r}" for m, r in unavailable]
    if family == "serving":
        slo_p99 = slo_p99_ms if slo_p99_ms is not None else slo.get("p99_ms")
        points = [{"id": s.config_id, "throughput": s.median("throughput_rps"), "p99": s.median("p99_ms")}
                  for s in summaries]
        front = [p["id"] for p in pareto_front(points, {"throughput": "higher", "p99": "lower"})]
        rec = recommend_serving(summaries, p99_ms=slo_p99)
        images = _serving_plots(summaries, out, slo_p99, front)
        lines += ["", "## Pareto front (throughput vs p99)", ""] + [f"- {c}" for c in front]
        target = f"p99 under {slo_p99:g} ms at the lowest cost" if slo_p99 else "no SLO stated"
    else:
        slo_ttq = slo_time_to_quality_s if slo_time_to_quality_s is not None else slo.get("time_to_quality_s")
        points = [{"id": s.config_id, "ttq": s.time_to_quality_mlperf_s,
                   "cost": s.median("cost_per_validated_checkpoint_usd")} for s in summaries]
        front = [p["id"] for p in pareto_front(points, {"ttq": "lower", "cost": "lower"})]
        rec = recommend_training(summaries, time_to_quality_s=slo_ttq)
        images = _training_plots(summaries, out)
        lines += ["", "## Pareto front (time-to-quality vs cost per validated checkpoint)", ""] + \
                 ([f"- {c}" for c in front] or ["- (none: costs or time-to-quality unavailable)"])
        target = f"quality within {slo_ttq:g} s at the lowest cost" if slo_ttq else "quality at the lowest cost"
    lines += ["", f"## Recommendation ({target})", "",
              f"**{rec.config_id}**: {rec.reason}" if rec.config_id else f"none: {rec.reason}", ""]
    if rec.config_id:
        knobs = next(s.knobs for s in summaries if s.config_id == rec.config_id)
        lines += ["```", *(f"{k}: {v}" for k, v in knobs.items()), "```", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    text = "\n".join(lines)
    md = out / "report.md"
    md.write_text(text)
    return Report(markdown_path=md, images=images, summaries=summaries, recommendation=rec, pareto=front, text=text)
