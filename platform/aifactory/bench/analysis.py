"""From trial records to per-configuration summaries, the Pareto front, and a recommendation for an SLO.

Pure functions over :class:`~aifactory.bench.results.TrialRecord` s (no Ray, no I/O, no plotting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aifactory.bench.results import TrialRecord
from aifactory.bench.stats import Summary, mlperf_time_to_quality, summarize

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction
    unit: str
    family: str  # "serving" | "training" | "any"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("throughput_rps", "higher", "req/s", "serving"),
    Metric("tokens_per_s", "higher", "tokens/s", "any"),  # generated (serving) or trained (training) tokens
    Metric("p50_ms", "lower", "ms", "serving"),
    Metric("p95_ms", "lower", "ms", "serving"),
    Metric("p99_ms", "lower", "ms", "serving"),
    Metric("ttft_p50_ms", "lower", "ms", "serving"),  # time to first token (generation engines)
    Metric("ttft_p99_ms", "lower", "ms", "serving"),
    Metric("error_rate", "lower", "", "serving"),
    Metric("cost_per_1k_requests_usd", "lower", "USD", "serving"),
    Metric("requests_per_usd", "higher", "req/USD", "serving"),
    Metric("requests_per_joule", "higher", "req/J", "serving"),
    Metric("cost_per_1m_tokens_usd", "lower", "USD", "serving"),
    Metric("time_to_quality_s", "lower", "s", "training"),
    Metric("samples_per_s", "higher", "samples/s", "training"),
    Metric("data_wait_fraction", "lower", "", "training"),  # share of a step spent waiting for data
    Metric("peak_memory_bytes", "lower", "B", "training"),
    Metric("final_val_loss", "lower", "", "training"),
    Metric("cost_per_validated_checkpoint_usd", "lower", "USD", "training"),
    Metric("samples_per_usd", "higher", "samples/USD", "training"),
    Metric("samples_per_joule", "higher", "samples/J", "training"),
)}


def metrics_of(family: str) -> list[Metric]:
    return [m for m in METRICS.values() if m.family in (family, "any")]


@dataclass
class ConfigSummary:
    """One configuration's figures over its repeats."""

    config_id: str
    knobs: dict[str, Any]
    num_ok: int
    num_failed: int
    metrics: dict[str, Summary] = field(default_factory=dict)
    time_to_quality_mlperf_s: float | None = None  # training: drop best and worst, mean of the rest
    unavailable: dict[str, str] = field(default_factory=dict)

    def median(self, metric: str) -> float | None:
        s = self.metrics.get(metric)
        return s.median if s else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_id": self.config_id, "knobs": self.knobs, "num_ok": self.num_ok, "num_failed": self.num_failed,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "time_to_quality_mlperf_s": self.time_to_quality_mlperf_s, "unavailable": self.unavailable,
        }


def summarize_configs(trials: Sequence[TrialRecord], *, family: str, method: str = "t",
                      seed: int = 0) -> list[ConfigSummary]:
    """Group trials by configuration (in first-seen order) and summarise every metric of ``family``."""
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        groups.setdefault(t.config_id, []).append(t)
    out = []
    for cid, ts in groups.items():
        ok = [t for t in ts if t.status == "ok"]
        cs = ConfigSummary(config_id=cid, knobs=ts[0].knobs, num_ok=len(ok), num_failed=len(ts) - len(ok))
        for m in metrics_of(family):
            values = [t.metrics.get(m.name) for t in ok]
            cs.metrics[m.name] = summarize(values, method=method, seed=seed)  # type: ignore[arg-type]
            reasons = {t.metrics.get("unavailable", {}).get(m.name) for t in ok} - {None}
            if cs.metrics[m.name].n == 0:
                cs.unavailable[m.name] = "; ".join(sorted(reasons)) or ("no successful trial" if not ok else "not measured")
        if family == "training" and len(ts) >= 3:
            # Failed runs count as "did not reach the target", so a crash cannot improve the figure.
            cs.time_to_quality_mlperf_s = mlperf_time_to_quality(
                [t.metrics.get("time_to_quality_s") if t.status == "ok" else None for t in ts])
        out.append(cs)
    return out


def pareto_front(points: Sequence[dict[str, Any]], objectives: dict[str, Direction]) -> list[dict[str, Any]]:
    """The points no other point dominates (at least as good on every objective, better on one).

    Points missing an objective (None) are left out: an unmeasured figure cannot be on the front.
    """
    usable = [p for p in points if all(p.get(k) is not None for k in objectives)]

    def better_or_equal(a, b, k):
        return a[k] >= b[k] if objectives[k] == "higher" else a[k] <= b[k]

    def dominates(a, b):
        return all(better_or_equal(a, b, k) for k in objectives) and any(a[k] != b[k] for k in objectives)

    return [p for p in usable if not any(dominates(q, p) for q in usable if q is not p)]


@dataclass(frozen=True)
class Recommendation:
    config_id: str | None
    reason: str


def recommend_serving(summaries: Sequence[ConfigSummary], *, p99_ms: float | None) -> Recommendation:
    """The configuration for "p99 under ``p99_ms`` at the lowest cost".

    A configuration meets the SLO when the upper end of its p99 interval (its median if no interval) is
    under the target and no request failed. Among those, the lowest median cost per 1k requests wins;
    where costs are unavailable, the highest median throughput (stated in the reason).
    """
    if p99_ms is None:
        return Recommendation(None, "no SLO stated (spec slo.p99_ms)")
    meeting = []
    for s in summaries:
        p99 = s.metrics.get("p99_ms")
        if p99 is None or p99.n == 0 or s.num_ok == 0:
            continue
        bound = p99.ci_high if p99.ci_high is not None else p99.median
        errors = s.median("error_rate") or 0.0
        if bound is not None and bound <= p99_ms and errors == 0.0:
            meeting.append(s)
    if not meeting:
        return Recommendation(None, f"no configuration kept p99 (95% CI upper bound) under {p99_ms:g} ms without errors")
    costed = [s for s in meeting if s.median("cost_per_1k_requests_usd") is not None]
    if costed:
        best = min(costed, key=lambda s: s.median("cost_per_1k_requests_usd"))
        return Recommendation(best.config_id, (
            f"p99 CI upper bound {best.metrics['p99_ms'].ci_high or best.median('p99_ms'):.1f} ms <= {p99_ms:g} ms; "
            f"lowest median cost per 1k requests (${best.median('cost_per_1k_requests_usd'):.6f}) of "
            f"{len(meeting)} configuration(s) meeting the SLO"))
    best = max(meeting, key=lambda s: s.median("throughput_rps") or 0.0)
    return Recommendation(best.config_id, (
        f"meets p99 <= {p99_ms:g} ms; costs unavailable, so the highest median throughput "
        f"({best.median('throughput_rps'):.1f} req/s) of {len(meeting)} configuration(s) meeting the SLO"))


def recommend_training(summaries: Sequence[ConfigSummary], *, time_to_quality_s: float | None) -> Recommendation:
    """The configuration reaching quality (MLPerf aggregate) within the target at the lowest cost."""
    reached = [s for s in summaries if s.time_to_quality_mlperf_s is not None
               and (time_to_quality_s is None or s.time_to_quality_mlperf_s <= time_to_quality_s)]
    if not reached:
        return Recommendation(None, "no configuration reached the validation-loss target in every repeat"
                              + (f" within {time_to_quality_s:g} s" if time_to_quality_s else ""))
    costed = [s for s in reached if s.median("cost_per_validated_checkpoint_usd") is not None]
    if costed:
        best = min(costed, key=lambda s: s.median("cost_per_validated_checkpoint_usd"))
        return Recommendation(best.config_id, (
            f"time-to-quality {best.time_to_quality_mlperf_s:.1f} s (MLPerf mean); lowest median cost per "
            f"validated checkpoint (${best.median('cost_per_validated_checkpoint_usd'):.6f})"))
    best = min(reached, key=lambda s: s.time_to_quality_mlperf_s)
    return Recommendation(best.config_id, f"fastest time-to-quality ({best.time_to_quality_mlperf_s:.1f} s); costs unavailable")
