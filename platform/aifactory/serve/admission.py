"""Adaptive admission: a replica sizes its own in-flight limit from measured latency (a gradient limiter).

A fixed bound (``max_ongoing_requests + max_queued_requests``) holds latency only where it was sized: the
overload benchmark used to calibrate saturation on one machine and search for a bound by hand, and the
bound was wrong as soon as load, hardware or the model changed. Here the app is given a latency objective
instead and adjusts the limit at run time, as Netflix's concurrency-limits ``Gradient2Limit`` and Envoy's
adaptive concurrency filter do:

- requests are sampled in windows (at least ``window_min_samples`` latencies and ``window_s`` long); a
  window's mean is the short-term latency, an exponential average over ``long_window`` windows the
  long-term one;
- gradient = clamp(tolerance x long / short, 0.5, 1): 1 while the short-term latency stays within the
  tolerance of the long-term one, shrinking as it rises (never more than halving the limit in a step);
- over the objective, the gradient is at most objective / short, so a slow drift of the long-term
  average under sustained overload (Gradient2's known weakness) cannot walk latency past the objective;
- new limit = limit x gradient + sqrt(limit) (headroom to probe upwards), clamped to [min_limit,
  max_limit]; a decrease is smoothed (``smoothing``), an increase is not (a smoothed probe of a small
  limit would round away to nothing); the limit does not grow while the app uses less than half of it (app-limited);
- when the long-term latency is over twice the short-term one (load has just receded) it decays by 5% a
  window, so the limiter returns to steady state without waiting for the slow average.

Requests over the limit are rejected at once, before any body is read (429 + Retry-After, see
:func:`over_limit_error`). :class:`GradientLimiter` is pure (an injectable clock, no Ray); the app calls
:meth:`GradientLimiter.try_acquire` / :meth:`GradientLimiter.release` around each request and
:class:`AdmissionGauges` exports the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from pydantic import Field, model_validator

from aifactory.config import StrictModel

ADMISSION_LIMIT = "aifactory_serve_admission_limit"
ADMISSION_IN_FLIGHT = "aifactory_serve_admission_in_flight"
ADMISSION_REJECTED = "aifactory_serve_admission_rejected_total"


class AdaptiveAdmission(StrictModel):
    """A latency objective instead of fixed bounds: each replica adjusts its in-flight limit (gradient limiter)."""

    latency_objective_s: float = Field(
        gt=0, description="Latency admitted requests are kept under: a window whose mean latency is over it "
        "shrinks the limit in proportion (objective / measured).")
    initial_limit: int = Field(16, ge=1, description="In-flight limit of a new replica, before any measurement.")
    min_limit: int = Field(2, ge=1, description="The limit never goes below this (a replica always admits some).")
    max_limit: int = Field(256, ge=1, description="The limit never goes above this; Serve's own per-replica bounds "
                           "are derived from it so that requests reach the limiter instead of Serve's queue.")
    tolerance: float = Field(1.5, ge=1.0, description="How far the short-term latency may rise above the long-term "
                             "one before the limit shrinks (Gradient2's rtt tolerance).")
    smoothing: float = Field(0.2, gt=0, le=1, description="Weight of a lower new limit against the old one (a rise is taken at once).")
    long_window: int = Field(600, ge=2, description="Windows the long-term latency averages over (exponentially).")
    window_s: float = Field(0.25, gt=0, description="Shortest window of latency samples, seconds.")
    window_min_samples: int = Field(10, ge=1, description="Fewest latency samples a window needs before it counts.")

    @model_validator(mode="after")
    def _check(self) -> AdaptiveAdmission:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(f"need min_limit ({self.min_limit}) <= initial_limit ({self.initial_limit}) <= "
                             f"max_limit ({self.max_limit})")
        return self

    def serve_bounds(self) -> dict[str, int]:
        """Serve's per-replica bounds under adaptive admission: wide enough that the limiter, not Serve's queue,
        decides (rejections pass through the replica too, briefly), and still a backstop."""
        return {"max_ongoing_requests": 2 * self.max_limit, "max_queued_requests": self.max_limit}


class _ExpAverage:
    """Plain mean of the first ``warmup`` values, then an exponential average over ``window`` values."""

    def __init__(self, window: int, warmup: int = 10):
        self.factor = 2.0 / (window + 1)
        self.warmup = warmup
        self.count = 0
        self.value = 0.0

    def add(self, x: float) -> float:
        if self.count < self.warmup:
            self.count += 1
            self.value += (x - self.value) / self.count
        else:
            self.value = self.value * (1 - self.factor) + x * self.factor
        return self.value


class GradientLimiter:
    """The in-flight limit of one replica, adjusted per window of latencies (see the module docstring)."""

    def __init__(self, cfg: AdaptiveAdmission, *, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.estimated_limit = float(cfg.initial_limit)
        self.in_flight = 0
        self.num_rejected = 0
        self.long_s = _ExpAverage(cfg.long_window)
        self.last_short_s: float | None = None
        self.last_gradient = 1.0
        self._window_start = clock()
        self._window_sum = 0.0
        self._window_n = 0
        self._window_peak = 0

    @property
    def limit(self) -> int:
        return int(self.estimated_limit)

    def try_acquire(self) -> bool:
        """Admit a request (True) or refuse it (False: answer 429 at once)."""
        if self.in_flight >= self.limit:
            self.num_rejected += 1
            return False
        self.in_flight += 1
        self._window_peak = max(self._window_peak, self.in_flight)
        return True

    def release(self, latency_s: float | None) -> None:
        """An admitted request ended; ``latency_s`` None for one that says nothing of the load (a 4xx)."""
        self.in_flight = max(0, self.in_flight - 1)
        if latency_s is None:
            return
        self._window_sum += latency_s
        self._window_n += 1
        now = self.clock()
        if self._window_n >= self.cfg.window_min_samples and now - self._window_start >= self.cfg.window_s:
            self.update(short_s=self._window_sum / self._window_n, peak_in_flight=self._window_peak)
            self._window_start, self._window_sum, self._window_n = now, 0.0, 0
            self._window_peak = self.in_flight

    def update(self, *, short_s: float, peak_in_flight: int) -> int:
        """One window's step: the new limit from its mean latency and the most requests it held at once."""
        cfg = self.cfg
        self.last_short_s = short_s
        long_s = self.long_s.add(short_s)
        if short_s > 0 and long_s / short_s > 2:  # load receded: do not wait for the slow average to notice
            self.long_s.value *= 0.95
        if peak_in_flight < self.estimated_limit / 2:  # app-limited: the latency says nothing about the limit
            return self.limit
        gradient = 1.0 if short_s <= 0 else max(0.5, min(1.0, cfg.tolerance * long_s / short_s))
        if short_s > cfg.latency_objective_s:
            gradient = min(gradient, max(0.5, cfg.latency_objective_s / short_s))
        self.last_gradient = gradient
        new = self.estimated_limit * gradient + math.sqrt(self.estimated_limit)
        if new < self.estimated_limit:  # backing off is smoothed; the probe up is not, or int() would eat it
            new = self.estimated_limit * (1 - cfg.smoothing) + new * cfg.smoothing
        self.estimated_limit = max(float(cfg.min_limit), min(float(cfg.max_limit), new))
        return self.limit

    def snapshot(self) -> dict[str, float | int | None]:
        return {"limit": self.limit, "in_flight": self.in_flight, "rejected": self.num_rejected,
                "short_latency_s": self.last_short_s, "long_latency_s": self.long_s.value if self.long_s.count else None,
                "gradient": self.last_gradient}


def over_limit_error(limiter: GradientLimiter, *, retry_after_s: float):
    """The fast rejection: 429, ``Retry-After`` in whole seconds (at least 1), the limit in the message."""
    from aifactory.serve.schemas import APIError

    retry = max(1, math.ceil(retry_after_s))
    return APIError(429, f"this replica is at its adaptive in-flight limit ({limiter.limit} requests); retry in "
                         f"{retry}s", code="over_capacity", type_="rate_limit_error",
                    headers={"Retry-After": str(retry)})


class AdmissionGauges:
    """Exports a limiter's limit, in-flight count and rejections as Ray metrics (application/deployment tags)."""

    def __init__(self, application: str, deployment: str):
        from ray.util import metrics

        tags = {"application": application, "deployment": deployment}
        keys = tuple(tags)
        self._limit = metrics.Gauge(ADMISSION_LIMIT, description="Adaptive in-flight limit of the replica.",
                                    tag_keys=keys)
        self._in_flight = metrics.Gauge(ADMISSION_IN_FLIGHT, description="Requests the replica admitted and "
                                        "has not answered yet.", tag_keys=keys)
        self._rejected = metrics.Counter(ADMISSION_REJECTED, description="Requests refused at the adaptive limit.",
                                         tag_keys=keys)
        for m in (self._limit, self._in_flight, self._rejected):
            m.set_default_tags(tags)
        self._last = (None, None)

    def record(self, limiter: GradientLimiter, *, rejected: bool = False) -> None:
        if rejected:
            self._rejected.inc()
        now = (limiter.limit, limiter.in_flight)
        if now != self._last:  # Gauge.set crosses into Ray's metrics agent: only on a change
            self._limit.set(now[0])
            self._in_flight.set(now[1])
            self._last = now
