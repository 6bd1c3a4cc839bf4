"""The gradient limiter of adaptive admission, without Ray: it grows under low latency, backs off when
latency rises or passes the objective, stays within [min, max], and refuses the excess at once."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aifactory.serve.admission import AdaptiveAdmission, GradientLimiter, over_limit_error
from aifactory.serve.config import AdmissionConfig


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _limiter(**kw) -> GradientLimiter:
    cfg = AdaptiveAdmission(**({"latency_objective_s": 0.2, "initial_limit": 10, "min_limit": 4,
                                "max_limit": 200} | kw))
    return GradientLimiter(cfg, clock=Clock())


def _saturated(lim: GradientLimiter, short_s: float, steps: int) -> list[int]:
    """Windows that keep the limit full (the app is not what limits) at ``short_s`` mean latency."""
    return [lim.update(short_s=short_s, peak_in_flight=lim.limit) for _ in range(steps)]


def test_converges_up_under_low_steady_latency_to_max():
    lim = _limiter()
    seen = _saturated(lim, 0.01, 200)
    assert seen == sorted(seen) and seen[0] > 10  # grows every window while latency holds
    assert seen[-1] == 200  # ... up to max_limit, not past it


def test_does_not_grow_while_the_app_uses_under_half_the_limit():
    lim = _limiter()
    for _ in range(50):
        assert lim.update(short_s=0.01, peak_in_flight=4) == 10


def test_backs_off_when_latency_rises_over_the_long_term_average():
    lim = _limiter(latency_objective_s=10.0)  # far objective: only the gradient acts
    _saturated(lim, 0.02, 60)
    before = lim.limit
    after = _saturated(lim, 0.08, 5)  # 4x the long-term latency: gradient 0.5
    assert after[0] < before and after == sorted(after, reverse=True)
    assert lim.last_gradient == pytest.approx(0.5, abs=0.2)


def test_over_the_objective_backs_off_even_when_the_long_term_average_has_caught_up():
    lim = _limiter(latency_objective_s=0.2, long_window=2)  # long-term average follows the short at once
    _saturated(lim, 0.1, 30)
    top = lim.limit
    down = _saturated(lim, 0.4, 40)  # steady at twice the objective: tolerance alone would say "fine"
    assert down[-1] < top / 2
    gradient_only = _limiter(latency_objective_s=100.0, long_window=2)
    _saturated(gradient_only, 0.1, 30)
    assert _saturated(gradient_only, 0.4, 40)[-1] >= top  # the objective, not the gradient, did it


def test_never_below_min_never_above_max():
    lim = _limiter()
    assert min(_saturated(lim, 5.0, 100)) >= 4 and lim.limit == 4  # far over the objective
    lim.update(short_s=0.0, peak_in_flight=4)  # a zero mean does not divide by zero
    assert 4 <= lim.limit <= 200


def test_try_acquire_refuses_the_excess_and_windows_update_the_limit():
    clock = Clock()
    lim = GradientLimiter(AdaptiveAdmission(latency_objective_s=0.2, initial_limit=4, min_limit=2, max_limit=64,
                                            window_s=0.1, window_min_samples=4), clock=clock)
    assert [lim.try_acquire() for _ in range(6)] == [True] * 4 + [False] * 2
    assert lim.num_rejected == 2 and lim.in_flight == 4
    for _ in range(4):
        lim.release(0.01)  # 4 samples, but the window is not 0.1 s old yet: no update
    assert lim.limit == 4 and lim.last_short_s is None
    for _ in range(4):
        assert lim.try_acquire()
    clock.t += 0.2
    for _ in range(4):
        lim.release(0.01)
    assert lim.last_short_s == pytest.approx(0.01) and lim.limit > 4  # a full window at low latency: grows
    lim.try_acquire()
    lim.release(None)  # a 4xx: frees its slot, adds no sample
    assert lim.in_flight == 0


def test_rejection_is_a_429_with_retry_after():
    err = over_limit_error(_limiter(), retry_after_s=0.3)
    assert err.status == 429 and err.headers == {"Retry-After": "1"} and err.code == "over_capacity"
    assert "10 requests" in err.body()["error"]["message"]


def test_config_is_typed_and_checked():
    with pytest.raises(ValidationError, match="initial_limit"):
        AdaptiveAdmission(latency_objective_s=0.2, initial_limit=1, min_limit=2)
    with pytest.raises(ValidationError, match="extra"):
        AdaptiveAdmission(latency_objective_s=0.2, bound=3)
    with pytest.raises(ValidationError, match="latency_objective_s"):
        AdaptiveAdmission(latency_objective_s=0)
    cfg = AdmissionConfig.model_validate({"adaptive": {"latency_objective_s": 0.25}})
    assert cfg.adaptive.latency_objective_s == 0.25 and AdmissionConfig().adaptive is None
    assert cfg.adaptive.serve_bounds() == {"max_ongoing_requests": 512, "max_queued_requests": 256}
    for name, field in AdaptiveAdmission.model_fields.items():
        assert field.description, name
