"""Gated canaries: whether a canary steps up, is promoted, aborts or holds, as a pure function of what both
versions served.

Why this exists: ``factory serve canary|promote|rollback`` (:mod:`aifactory.serve.deploy`) move traffic exactly,
but nothing watches the canary (issue 18 asks for "preapproved abort conditions"). A :class:`CanaryPlan`, fixed
before the canary starts, says how traffic steps up (5 -> 25 -> 50 -> 100%), how long and over how many canary
requests each step must hold, when the canary aborts and when it may go on. :class:`CanaryGate` judges the plan
over a :class:`SlidingWindow` of per-request records of both sides and returns a :class:`Decision` that carries
the figures that caused it. The controller that moves traffic (``deploy.canary`` / ``promote`` / ``rollback``)
and writes :func:`audit_event` to the audit log is a few lines around it; the gate's :class:`CanaryState` is
plain JSON, so a controller restarted mid-canary resumes at the same step with the same plan.

At each :meth:`CanaryGate.evaluate` the figures are those of the current step: records inside the window and no
older than the step's start, so a step is judged on traffic at its own share. Then, in order:

1. **abort** as soon as any abort bound is crossed. Error rates are judged once the canary has served the
   step's ``min_requests``, or earlier when the error count alone already proves it: more errors than
   ``threshold x min_requests`` exceed the threshold even if every remaining request succeeds.
   Latency and quality bounds wait for ``min_requests``.
2. **hold** until the step has lasted ``min_dwell_s`` and the canary has served ``min_requests``, or while a
   promote bound is not met (or cannot be judged yet: too few scored requests, no stable figures).
3. otherwise **step_up** to the next share, or **promote** from the last step (100%).

Comparisons with the stable version use its figures of the same step when it served ``min_stable_requests``;
otherwise (at 100% the stable version serves nothing) the last such figures, kept in the state as the baseline.
Latency percentiles count every request, failed ones included: it is what callers waited.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, model_validator

from aifactory.config import StrictModel

Side = Literal["stable", "canary"]
Action = Literal["hold", "step_up", "promote", "abort"]
AUDIT_ACTION_PREFIX = "serve.canary"


def _percentile(values: list[float], q: int) -> float | None:
    # statistics' "inclusive" method is the linear interpolation of aifactory.bench.stats.percentile (numpy's
    # default); serve cannot import bench (bench builds serve apps: the import would close a cycle).
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class RequestRecord(StrictModel):
    """One request as the app's metrics saw it."""

    side: Side = Field(description="Which version served it.")
    ok: bool = Field(description="Whether it succeeded (a 5xx or an exception in the model is not ok).")
    latency_s: float = Field(ge=0, allow_inf_nan=False, description="Time from arrival to the answer, seconds.")
    quality: float | None = Field(None, allow_inf_nan=False,
                                  description="The app's quality score of the answer, where it has one.")
    ts: float = Field(allow_inf_nan=False, description="When it finished, epoch seconds.")


class SideFigures(StrictModel):
    """What one side served over a span: counts, error rate, latency percentiles, mean quality."""

    n: int = Field(0, ge=0, description="Requests served.")
    errors: int = Field(0, ge=0, description="Requests that failed.")
    error_rate: float | None = Field(None, description="errors / n; None when n is 0.")
    p50_s: float | None = Field(None, description="Median latency, seconds (all requests, failed included).")
    p99_s: float | None = Field(None, description="99th percentile latency, seconds.")
    quality: float | None = Field(None, description="Mean quality score over the scored requests.")
    quality_n: int = Field(0, ge=0, description="Requests that carried a quality score.")

    @classmethod
    def of(cls, oks: Iterable[bool], latencies_s: Iterable[float],
           qualities: Iterable[float | None] = ()) -> SideFigures:
        oks, lat = list(oks), sorted(latencies_s)
        scored = [q for q in qualities if q is not None]
        errors = sum(1 for ok in oks if not ok)
        return cls(n=len(oks), errors=errors, error_rate=errors / len(oks) if oks else None,
                   p50_s=_percentile(lat, 50), p99_s=_percentile(lat, 99),
                   quality=sum(scored) / len(scored) if scored else None, quality_n=len(scored))

    @classmethod
    def of_records(cls, records: Iterable[RequestRecord]) -> SideFigures:
        records = list(records)
        return cls.of((r.ok for r in records), (r.latency_s for r in records), (r.quality for r in records))


class CanaryBounds(StrictModel):
    """Limits on the canary's figures; a limit left unset is not judged."""

    max_error_rate: float | None = Field(None, ge=0, le=1, description="Canary error rate, as a fraction.")
    max_error_rate_over_stable: float | None = Field(
        None, ge=0, le=1, description="Canary error rate minus the stable one, as a fraction (0.02: 2 points).")
    max_p99_s: float | None = Field(None, gt=0, description="Canary p99 latency, seconds.")
    max_p99_ratio: float | None = Field(None, gt=0, description="Canary p99 / stable p99.")
    max_quality_drop: float | None = Field(
        None, ge=0, description="Stable mean quality minus canary mean quality, in the score's units.")

    def relative(self) -> list[str]:
        return [f for f in ("max_error_rate_over_stable", "max_p99_ratio", "max_quality_drop")
                if getattr(self, f) is not None]


class CanaryPlan(StrictModel):
    """How a canary steps up and when it aborts or goes on: decided before it starts, never changed on the way."""

    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0],
                               description="Canary traffic shares, percent: strictly increasing, ending at 100.")
    min_dwell_s: float = Field(60.0, ge=0, description="Shortest time a step lasts before it may step up, seconds.")
    min_requests: int = Field(200, ge=1, description="Canary requests a step must see before it may step up.")
    min_stable_requests: int = Field(
        50, ge=1, description="Stable requests a step needs for its stable figures to be compared with.")
    min_quality_samples: int = Field(20, ge=1, description="Scored requests per side before quality is compared.")
    window_s: float = Field(300.0, gt=0, description="Length of the sliding window of request records, seconds.")
    abort: CanaryBounds = Field(
        default_factory=lambda: CanaryBounds(max_error_rate=0.05, max_error_rate_over_stable=0.02,
                                             max_p99_ratio=2.0),
        description="Crossing any of these rolls the canary back at once.")
    promote: CanaryBounds = Field(
        default_factory=lambda: CanaryBounds(max_error_rate=0.01, max_error_rate_over_stable=0.005,
                                             max_p99_ratio=1.2),
        description="All of these must hold for a step to step up (or, at 100%, to promote).")

    @model_validator(mode="after")
    def _check(self) -> CanaryPlan:
        problems = []
        s = self.steps
        if not s:
            problems.append("steps: at least one step is required (the last one 100)")
        else:
            if any(not 0 < p <= 100 for p in s):
                problems.append(f"steps: each step must be in (0, 100] percent (got {s})")
            if any(b <= a for a, b in itertools.pairwise(s)):
                problems.append(f"steps: must be strictly increasing (got {s})")
            if s[-1] != 100:
                problems.append(f"steps: the last step must be 100 (got {s[-1]:g})")
            if s == [100] and (self.abort.relative() or self.promote.relative()):
                problems.append(f"steps: [100] leaves no stable traffic to compare with, but abort/promote set "
                                f"{sorted(set(self.abort.relative() + self.promote.relative()))}")
        for name in CanaryBounds.model_fields:
            a, p = getattr(self.abort, name), getattr(self.promote, name)
            if a is not None and p is not None and p > a:
                problems.append(f"promote.{name} ({p:g}) > abort.{name} ({a:g}): a canary could abort while "
                                "within its promote bounds")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Decision(StrictModel):
    """One evaluation of the gate, with the figures that caused it."""

    action: Action = Field(description="hold, step_up (to to_percent), promote or abort.")
    reason: str = Field(description="One line: why.")
    ts: float = Field(description="When it was decided, epoch seconds.")
    app: str = Field(description="Serve application of the canary.")
    stable_version: str
    canary_version: str
    step: int = Field(description="Index in the plan's steps of the step that was judged.")
    percent: float = Field(description="Canary share of the step that was judged.")
    to_percent: float | None = Field(None, description="The canary share this decision sets (promote: 100, "
                                                       "abort: 0); None for hold.")
    dwell_s: float = Field(description="How long the judged step had lasted.")
    canary: SideFigures
    stable: SideFigures
    reference: Literal["stable", "baseline"] | None = Field(
        None, description="Stable figures compared with: this step's, the baseline from an earlier step, or none.")
    reference_figures: SideFigures | None = None


class CanaryState(StrictModel):
    """The state machine of one gated canary; ``model_dump()`` it to persist, ``model_validate`` to resume."""

    app: str
    stable_version: str
    canary_version: str
    plan: CanaryPlan
    started_at: float = Field(description="When the canary started, epoch seconds.")
    step: int = Field(0, ge=0, description="Index in plan.steps of the current step.")
    step_started_at: float = Field(description="When the current step started, epoch seconds.")
    status: Literal["running", "promoted", "aborted"] = "running"
    baseline: SideFigures | None = Field(
        None, description="The last stable figures with enough requests, for steps where stable serves little.")
    last: Decision | None = Field(None, description="The latest decision, holds included.")
    history: list[Decision] = Field(default_factory=list,
                                    description="Every decision that changed something: step_up, promote, abort.")

    @property
    def percent(self) -> float:
        return self.plan.steps[self.step]

    @property
    def done(self) -> bool:
        return self.status != "running"


class SlidingWindow:
    """The request records of the last ``window_s`` seconds, per side."""

    def __init__(self, window_s: float):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._records: dict[str, deque[RequestRecord]] = {"stable": deque(), "canary": deque()}

    def add(self, record: RequestRecord) -> None:
        self._records[record.side].append(record)

    def records(self, side: Side, *, now: float, since: float | None = None) -> list[RequestRecord]:
        start = now - self.window_s
        kept = self._records[side]
        while kept and kept[0].ts < start:  # records arrive roughly in time order; the filter below is exact
            kept.popleft()
        lo = start if since is None else max(start, since)
        return [r for r in kept if lo <= r.ts <= now]

    def figures(self, side: Side, *, now: float, since: float | None = None) -> SideFigures:
        return SideFigures.of_records(self.records(side, now=now, since=since))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


class CanaryGate:
    """Judges one canary's plan over its window of request records; :meth:`evaluate` moves its state."""

    def __init__(self, state: CanaryState, *, window: SlidingWindow | None = None):
        self.state = state
        self.window = window or SlidingWindow(state.plan.window_s)

    @classmethod
    def start(cls, *, app: str, stable_version: str, canary_version: str, plan: CanaryPlan | None = None,
              now: float) -> CanaryGate:
        return cls(CanaryState(app=app, stable_version=stable_version, canary_version=canary_version,
                               plan=plan or CanaryPlan(), started_at=now, step_started_at=now))

    def observe(self, record: RequestRecord) -> None:
        self.window.add(record)

    def evaluate(self, now: float) -> Decision:
        """Decide, record the decision in the state, and move to the next step (or the end) when it says so.
        Once promoted or aborted, the final decision is returned again and nothing changes."""
        st = self.state
        if st.done:
            assert st.last is not None
            return st.last
        plan, since = st.plan, st.step_started_at
        canary = self.window.figures("canary", now=now, since=since)
        stable = self.window.figures("stable", now=now, since=since)
        if stable.n >= plan.min_stable_requests:
            st.baseline = stable
            ref, ref_kind = stable, "stable"
        elif st.baseline is not None:
            ref, ref_kind = st.baseline, "baseline"
        else:
            ref, ref_kind = None, None
        dwell_s = now - since

        def decide(action: Action, reason: str, to: float | None = None) -> Decision:
            return Decision(action=action, reason=reason, ts=now, app=st.app, stable_version=st.stable_version,
                            canary_version=st.canary_version, step=st.step, percent=st.percent, to_percent=to,
                            dwell_s=dwell_s, canary=canary, stable=stable, reference=ref_kind,
                            reference_figures=ref)

        tripped = self._crossed(plan.abort, canary, ref, promote=False)
        if tripped:
            d = decide("abort", "; ".join(tripped), 0.0)
            st.status = "aborted"
        else:
            waiting = []
            if dwell_s < plan.min_dwell_s:
                waiting.append(f"dwell {dwell_s:.0f}/{plan.min_dwell_s:.0f} s")
            if canary.n < plan.min_requests:
                waiting.append(f"{canary.n}/{plan.min_requests} canary requests")
            if not waiting:
                waiting = [f"promote needs {w}" for w in self._crossed(plan.promote, canary, ref, promote=True)]
            if waiting:
                d = decide("hold", "; ".join(waiting))
            elif st.step + 1 < len(plan.steps):
                nxt = plan.steps[st.step + 1]
                d = decide("step_up", f"{st.percent:g}% held {dwell_s:.0f} s over {canary.n} canary requests "
                                      f"within promote bounds: up to {nxt:g}%", nxt)
                st.step += 1
                st.step_started_at = now
            else:
                d = decide("promote", f"{st.percent:g}% held {dwell_s:.0f} s over {canary.n} canary requests "
                                      "within promote bounds", 100.0)
                st.status = "promoted"
        st.last = d
        if d.action != "hold":
            st.history.append(d)
        return d

    def _crossed(self, bounds: CanaryBounds, c: SideFigures, ref: SideFigures | None, *,
                 promote: bool) -> list[str]:
        """The bounds the canary's figures ``c`` cross, one phrase each.

        For abort (``promote=False``) error counts can trip before min_requests and a bound that cannot be
        judged yet (no stable figures, too few scored requests) is passed over; for promote such a bound
        counts as not met, so the canary holds rather than going on without the evidence."""
        plan = self.state.plan
        out: list[str] = []
        enough = c.n >= plan.min_requests

        def crossed(figure: str, now: str, bound: str) -> None:
            out.append(f"{figure} <= {bound} (now {now})" if promote else f"{figure} {now} > {bound}")

        def errors_over(threshold: float, bound: str) -> None:
            if c.errors <= threshold * max(c.n, plan.min_requests):
                return
            if enough:
                crossed("canary error rate", f"{_pct(c.error_rate)} ({c.errors}/{c.n})", bound)
            elif not promote:  # more errors than the threshold allows in the whole step: proven already
                out.append(f"canary {c.errors} errors in {c.n} requests already exceed {bound} of the "
                           f"step's {plan.min_requests}")

        if bounds.max_error_rate is not None:
            errors_over(bounds.max_error_rate, _pct(bounds.max_error_rate))
        if bounds.max_error_rate_over_stable is not None:
            if ref is None or ref.error_rate is None:
                if promote:
                    out.append("stable figures to compare error rates with (none yet)")
            else:
                errors_over(ref.error_rate + bounds.max_error_rate_over_stable,
                            f"stable {_pct(ref.error_rate)} + {_pct(bounds.max_error_rate_over_stable)}")
        if not enough or c.p99_s is None:
            return out  # latency and quality wait for the step's requests (a hold says so already)
        if bounds.max_p99_s is not None and c.p99_s > bounds.max_p99_s:
            crossed("canary p99", _sec(c.p99_s), _sec(bounds.max_p99_s))
        if bounds.max_p99_ratio is not None:
            if ref is None or ref.p99_s is None:
                if promote:
                    out.append("stable figures to compare p99 with (none yet)")
            elif c.p99_s > bounds.max_p99_ratio * ref.p99_s:
                crossed("canary p99", _sec(c.p99_s), f"{bounds.max_p99_ratio:g} x stable {_sec(ref.p99_s)}")
        if bounds.max_quality_drop is not None:
            need = plan.min_quality_samples
            if c.quality_n < need or ref is None or ref.quality_n < need:
                if promote:
                    out.append(f"{need} scored requests per side to compare quality (canary {c.quality_n}, "
                               f"stable {0 if ref is None else ref.quality_n})")
            elif ref.quality - c.quality > bounds.max_quality_drop:
                out.append(f"canary quality >= stable {ref.quality:.3f} - {bounds.max_quality_drop:g} "
                           f"(now {c.quality:.3f})" if promote else
                           f"canary quality {c.quality:.3f} < stable {ref.quality:.3f} - {bounds.max_quality_drop:g}")
        return out


def audit_event(decision: Decision) -> dict[str, Any]:
    """The audit entry of a decision: ``audit.record(home, actor=..., **audit_event(d))`` (action
    ``serve.canary.<action>``, target the application, detail the figures that caused it)."""
    return {"action": f"{AUDIT_ACTION_PREFIX}.{decision.action}", "target": decision.app,
            "detail": decision.model_dump(mode="json", exclude={"app"})}


def status_line(state: CanaryState) -> str:
    """One line for ``factory serve status``: where the canary is and why."""
    v, last = state.canary_version, state.last
    if state.status == "promoted":
        return f"canary {v} promoted: {last.reason if last else ''}".rstrip(": ")
    if state.status == "aborted":
        at = f"{last.percent:g}%" if last else f"{state.percent:g}%"
        return f"canary {v} aborted at {at}: {last.reason if last else ''}".rstrip(": ")
    head = f"canary {v} at {state.percent:g}%"
    need = state.plan.min_requests
    if last is None:
        return f"{head}: starting, 0/{need} requests"
    if last.action == "step_up":
        return f"{head}: stepped up from {last.percent:g}%, 0/{need} requests"
    ref = last.reference_figures
    c99 = "-" if last.canary.p99_s is None else f"{last.canary.p99_s:.2f} s"
    s99 = "-" if ref is None or ref.p99_s is None else f"{ref.p99_s:.2f} s"
    return f"{head}: holding, {last.canary.n}/{need} requests, p99 {c99} vs {s99} ({last.reason})"
