"""Regressions between two benchmark runs of the same configurations.

A configuration regressed on a metric when its candidate median is worse than the baseline median by more
than ``threshold`` (relative) **and** the two confidence intervals do not overlap: a moved median inside
overlapping intervals is noise the repeats cannot tell from a change. Improvements use the mirror rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from aifactory.bench.analysis import METRICS, ConfigSummary, summarize_configs
from aifactory.bench.results import RunRecord, TrialRecord
from aifactory.bench.stats import intervals_overlap
from aifactory.exceptions import FactoryError

DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class Change:
    config_id: str
    metric: str
    direction: str
    baseline_median: float
    candidate_median: float
    change_pct: float
    baseline_ci: tuple[float | None, float | None]
    candidate_ci: tuple[float | None, float | None]
    verdict: str  # "regression" | "improvement" | "within noise" | "within threshold"

    def describe(self) -> str:
        unit = METRICS[self.metric].unit if self.metric in METRICS else ""
        return (f"{self.config_id}: {self.metric} {self.baseline_median:.4g} -> {self.candidate_median:.4g} {unit} "
                f"({self.change_pct:+.1f}%, {self.direction} is better; CIs "
                f"[{_f(self.baseline_ci[0])}, {_f(self.baseline_ci[1])}] vs "
                f"[{_f(self.candidate_ci[0])}, {_f(self.candidate_ci[1])}])").replace("  ", " ")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@dataclass
class Comparison:
    baseline: str
    candidate: str
    threshold: float
    changes: list[Change] = field(default_factory=list)
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_candidate: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "regression"]

    @property
    def improvements(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "improvement"]

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "candidate": self.candidate, "threshold": self.threshold,
                "regressions": [asdict(c) for c in self.regressions],
                "improvements": [asdict(c) for c in self.improvements],
                "changes": [asdict(c) for c in self.changes],
                "only_in_baseline": self.only_in_baseline, "only_in_candidate": self.only_in_candidate}


def judge(*, direction: str, base_median: float, cand_median: float, base_ci, cand_ci, threshold: float) -> str:
    """The verdict of one metric of one configuration (see the module docstring)."""
    if base_median == 0:
        rel = 0.0 if cand_median == 0 else float("inf") * (1 if cand_median > 0 else -1)
    else:
        rel = (cand_median - base_median) / abs(base_median)
    worse = rel > threshold if direction == "lower" else rel < -threshold
    better = rel < -threshold if direction == "lower" else rel > threshold
    if not (worse or better):
        return "within threshold"
    if intervals_overlap(base_ci, cand_ci):
        return "within noise"
    return "regression" if worse else "improvement"


def compare(baseline: Sequence[ConfigSummary], candidate: Sequence[ConfigSummary], *,
            threshold: float = DEFAULT_THRESHOLD, metrics: Sequence[str] | None = None,
            baseline_name: str = "baseline", candidate_name: str = "candidate") -> Comparison:
    """Compare per-configuration summaries of two runs, metric by metric."""
    if not 0 <= threshold < 10:
        raise FactoryError(f"threshold must be a fraction in [0, 10), e.g. 0.05 for 5%; got {threshold}")
    base = {s.config_id: s for s in baseline}
    cand = {s.config_id: s for s in candidate}
    out = Comparison(baseline_name, candidate_name, threshold,
                     only_in_baseline=sorted(set(base) - set(cand)), only_in_candidate=sorted(set(cand) - set(base)))
    for cid in [c for c in base if c in cand]:
        b, c = base[cid], cand[cid]
        for name in metrics or [m for m in b.metrics if m in c.metrics]:
            if name not in METRICS:
                raise FactoryError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
            bs, cs = b.metrics.get(name), c.metrics.get(name)
            if bs is None or cs is None or bs.median is None or cs.median is None:
                continue  # unmeasured on one side: nothing to compare
            direction = METRICS[name].direction
            verdict = judge(direction=direction, base_median=bs.median, cand_median=cs.median,
                            base_ci=(bs.ci_low, bs.ci_high), cand_ci=(cs.ci_low, cs.ci_high), threshold=threshold)
            pct = 0.0 if bs.median == 0 else (cs.median - bs.median) / abs(bs.median) * 100
            out.changes.append(Change(cid, name, direction, bs.median, cs.median, pct, (bs.ci_low, bs.ci_high),
                                      (cs.ci_low, cs.ci_high), verdict))
    return out


def compare_runs(baseline: tuple[RunRecord, list[TrialRecord]], candidate: tuple[RunRecord, list[TrialRecord]], *,
                 threshold: float = DEFAULT_THRESHOLD, metrics: Sequence[str] | None = None) -> Comparison:
    (brun, btrials), (crun, ctrials) = baseline, candidate
    if brun.kind != crun.kind:
        raise FactoryError(f"cannot compare a {brun.kind!r} run ({brun.run_id}) with a {crun.kind!r} run ({crun.run_id})")
    family = "serving" if brun.kind.startswith("serve") else "training"
    method = brun.spec.get("ci_method", "t")
    return compare(summarize_configs(btrials, family=family, method=method),
                   summarize_configs(ctrials, family=family, method=method),
                   threshold=threshold, metrics=metrics, baseline_name=brun.run_id, candidate_name=crun.run_id)
