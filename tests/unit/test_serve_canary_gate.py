"""The canary gate: a plan decided up front, judged over a sliding window, stepping up, promoting or aborting."""

from __future__ import annotations

import json

import pytest

from aifactory import audit
from aifactory.bench.stats import percentile
from aifactory.config import parse_config
from aifactory.exceptions import ConfigError
from aifactory.home import FactoryHome
from aifactory.serve.canary_gate import (
    CanaryBounds, CanaryGate, CanaryPlan, CanaryState, RequestRecord, SideFigures, SlidingWindow, audit_event,
    status_line,
)

T0 = 1_800_000_000.0


def serve(gate: CanaryGate, *, start: float, seconds: float, canary_per_s: int, stable_per_s: int = 20,
          canary_ok=lambda i: True, canary_latency_s=0.10, stable_latency_s=0.10, canary_quality=None,
          stable_quality=None) -> float:
    """Feed ``seconds`` of steady traffic (per-second batches) to the gate; returns the end time."""
    i = 0
    for s in range(int(seconds)):
        ts = start + s + 0.5
        for _ in range(stable_per_s):
            gate.observe(RequestRecord(side="stable", ok=True, latency_s=stable_latency_s, quality=stable_quality,
                                       ts=ts))
        for _ in range(canary_per_s):
            gate.observe(RequestRecord(side="canary", ok=canary_ok(i), latency_s=canary_latency_s,
                                       quality=canary_quality, ts=ts))
            i += 1
    return start + seconds


def plan(**kw) -> CanaryPlan:
    return CanaryPlan(**{"min_dwell_s": 30, "min_requests": 100, "min_stable_requests": 50, **kw})


def test_a_plan_with_every_mistake_is_refused_once_naming_each():
    with pytest.raises(ConfigError) as err:
        parse_config(CanaryPlan, {"steps": [25, 5, 50], "abort": {"max_error_rate": 0.05},
                                  "promote": {"max_error_rate": 0.10}}, source="canary plan")
    text = str(err.value)
    assert "strictly increasing" in text and "last step must be 100" in text
    assert "promote.max_error_rate (0.1) > abort.max_error_rate (0.05)" in text
    with pytest.raises(ConfigError, match="no stable traffic"):
        parse_config(CanaryPlan, {"steps": [100]}, source="canary plan")  # default bounds compare with stable
    assert CanaryPlan().steps == [5, 25, 50, 100]


def test_a_good_canary_holds_for_dwell_and_requests_then_steps_up_to_100_and_promotes():
    gate = CanaryGate.start(app="completions", stable_version="v1", canary_version="v2", plan=plan(), now=T0)
    t = serve(gate, start=T0, seconds=29, canary_per_s=5)  # 145 canary requests, but only 29 s of dwell
    d = gate.evaluate(t)
    assert d.action == "hold" and "dwell 29/30 s" in d.reason and d.canary.n == 145
    actions = []
    for _ in range(20):
        at_100 = gate.state.percent == 100  # the stable version then serves nothing
        t = serve(gate, start=t, seconds=31, canary_per_s=4, stable_per_s=0 if at_100 else 20)
        d = gate.evaluate(t)
        actions.append((d.action, d.to_percent))
        if gate.state.done:
            break
    assert actions == [("step_up", 25), ("step_up", 50), ("step_up", 100), ("promote", 100)]
    assert gate.state.status == "promoted"
    assert [h.action for h in gate.state.history] == ["step_up", "step_up", "step_up", "promote"]
    # at 100% the p99 ratio and error points were judged against the 50% step's stable figures
    promoted = gate.state.history[-1]
    assert promoted.stable.n == 0 and promoted.reference == "baseline"
    assert promoted.reference_figures == gate.state.history[-2].stable
    assert gate.evaluate(t + 100) == gate.state.last  # done: nothing moves any more


def test_too_few_canary_requests_hold_even_after_the_dwell():
    gate = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=plan(), now=T0)
    t = serve(gate, start=T0, seconds=60, canary_per_s=1)
    d = gate.evaluate(t)
    assert d.action == "hold" and d.reason == "60/100 canary requests"


def test_errors_abort_before_min_requests_once_the_count_alone_proves_it():
    p = plan(abort=CanaryBounds(max_error_rate=0.05), promote=CanaryBounds(max_error_rate=0.01))
    gate = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=p, now=T0)
    # 5 errors: 5 > 0.05 x 100 is false; the other 95 requests of the step could still bring it to 5%
    t = serve(gate, start=T0, seconds=1, canary_per_s=10, canary_ok=lambda i: i >= 5)
    assert gate.evaluate(t).action == "hold"
    t = serve(gate, start=t, seconds=1, canary_per_s=1, canary_ok=lambda i: False)  # the 6th error
    d = gate.evaluate(t)
    assert d.action == "abort" and d.to_percent == 0 and d.canary.n == 11 and d.canary.errors == 6
    assert "6 errors in 11 requests already exceed 5.0%" in d.reason
    assert gate.state.status == "aborted" and gate.state.history == [d]


def test_error_rate_over_the_stables_by_more_than_the_allowed_points_aborts():
    p = plan(abort=CanaryBounds(max_error_rate=0.10, max_error_rate_over_stable=0.02),
             promote=CanaryBounds(max_error_rate=0.10, max_error_rate_over_stable=0.02))
    gate = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=p, now=T0)
    t = serve(gate, start=T0, seconds=40, canary_per_s=5, canary_ok=lambda i: i % 25 != 0)  # 4% < 10%
    d = gate.evaluate(t)
    assert d.action == "abort" and d.reference == "stable" and d.stable.error_rate == 0
    assert "canary error rate 4.0% (8/200) > stable 0.0% + 2.0%" in d.reason


def test_p99_over_ratio_x_stable_aborts_and_between_the_bounds_holds():
    slow = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=plan(), now=T0)
    t = serve(slow, start=T0, seconds=40, canary_per_s=5, canary_latency_s=0.25, stable_latency_s=0.10)
    d = slow.evaluate(t)
    assert d.action == "abort" and "canary p99 0.250 s > 2 x stable 0.100 s" in d.reason
    # 1.5x: under the abort ratio (2) but over the promote ratio (1.2): it holds and says what it waits for
    meh = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=plan(), now=T0)
    t = serve(meh, start=T0, seconds=40, canary_per_s=5, canary_latency_s=0.15, stable_latency_s=0.10)
    d = meh.evaluate(t)
    assert d.action == "hold" and d.reason == "promote needs canary p99 <= 1.2 x stable 0.100 s (now 0.150 s)"


def test_quality_below_stable_aborts_and_unscored_traffic_cannot_promote():
    bounds = {"abort": CanaryBounds(max_quality_drop=0.10), "promote": CanaryBounds(max_quality_drop=0.05)}
    bad = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=plan(**bounds), now=T0)
    t = serve(bad, start=T0, seconds=40, canary_per_s=5, canary_quality=0.6, stable_quality=0.8)
    d = bad.evaluate(t)
    assert d.action == "abort" and d.canary.quality == pytest.approx(0.6) and "quality 0.600 < stable 0.800" in d.reason
    unscored = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=plan(**bounds), now=T0)
    t = serve(unscored, start=T0, seconds=40, canary_per_s=5)
    d = unscored.evaluate(t)
    assert d.action == "hold" and "20 scored requests per side to compare quality (canary 0" in d.reason


def test_records_older_than_the_window_are_forgotten():
    window = SlidingWindow(10.0)
    for k in range(5):
        window.add(RequestRecord(side="canary", ok=False, latency_s=1.0, ts=T0 + k))
    for k in range(5):
        window.add(RequestRecord(side="canary", ok=True, latency_s=0.1, ts=T0 + 20 + k))
    window.add(RequestRecord(side="canary", ok=False, latency_s=1.0, ts=T0 + 3))  # reported late, still old
    assert window.figures("canary", now=T0 + 25).errors == 0
    assert window.figures("canary", now=T0 + 25).n == 5
    assert window.figures("stable", now=T0 + 25).n == 0


def test_side_figures_use_the_toolkits_percentile_definition():
    lat = [0.01 * k for k in range(1, 138)] + [2.0, 3.5]
    f = SideFigures.of([True] * len(lat), lat)
    assert f.p50_s == pytest.approx(percentile(lat, 50)) and f.p99_s == pytest.approx(percentile(lat, 99))
    assert SideFigures.of([True], [0.3]).p99_s == 0.3 and SideFigures.of([], []).p99_s is None


def test_a_controller_restarted_mid_canary_resumes_at_the_same_step_and_dwell():
    gate = CanaryGate.start(app="a", stable_version="v1", canary_version="v2", plan=plan(), now=T0)
    t = serve(gate, start=T0, seconds=31, canary_per_s=4)
    assert gate.evaluate(t).action == "step_up"
    t = serve(gate, start=t, seconds=20, canary_per_s=10)
    saved = json.dumps(gate.state.model_dump(mode="json"))
    resumed = CanaryGate(CanaryState.model_validate(json.loads(saved)))  # a new process: empty window
    assert resumed.state == gate.state and resumed.state.percent == 25
    t = serve(resumed, start=t, seconds=11, canary_per_s=10)  # 31 s into the step, 110 requests since restart
    d = resumed.evaluate(t)
    assert d.action == "step_up" and d.percent == 25 and d.to_percent == 50 and d.dwell_s == pytest.approx(31)


def test_a_decision_is_an_audit_entry_with_its_figures_and_a_status_line(tmp_path, monkeypatch):
    monkeypatch.delenv("AIFACTORY_AUDIT_ANCHOR", raising=False)
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    gate = CanaryGate.start(app="completions", stable_version="v1", canary_version="v2", plan=plan(), now=T0)
    assert status_line(gate.state) == "canary v2 at 5%: starting, 0/100 requests"
    t = serve(gate, start=T0, seconds=10, canary_per_s=7, canary_latency_s=0.21, stable_latency_s=0.20)
    gate.evaluate(t)
    assert status_line(gate.state) == ("canary v2 at 5%: holding, 70/100 requests, p99 0.21 s vs 0.20 s "
                                       "(dwell 10/30 s; 70/100 canary requests)")
    t = serve(gate, start=t, seconds=10, canary_per_s=7, canary_ok=lambda i: i > 10)
    d = gate.evaluate(t)
    assert d.action == "abort"
    audit.record(home, actor="canary-controller", **audit_event(d))
    (entry,) = audit.query(home, action="serve.canary")
    assert entry.action == "serve.canary.abort" and entry.target == "completions"
    assert entry.detail["canary"]["errors"] == 11 and entry.detail["canary_version"] == "v2"
    assert entry.detail["reason"] == d.reason
    assert status_line(gate.state) == f"canary v2 aborted at 5%: {d.reason}"
