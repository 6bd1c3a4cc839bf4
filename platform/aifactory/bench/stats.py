"""Statistics over repeated trials: mean, median, 95% confidence intervals, MLPerf time-to-quality.

Pure functions of lists of floats (no Ray, no I/O). Two interval methods:

- ``"t"``: the Student-t interval of the mean, ``mean ± t(1-α/2, n-1) · s/√n``; right for few repeats of a
  roughly normal quantity (throughput, latency percentiles of a steady load).
- ``"bootstrap"``: the percentile bootstrap of a statistic (the median by default), seeded so that the same
  samples always give the same interval.

Time-to-quality follows MLPerf Training's rule: of ``n`` runs drop the fastest and the slowest and average
the rest, so that one lucky or unlucky seed does not decide the result.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

CIMethod = Literal["t", "bootstrap"]
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000


def _clean(samples: Sequence[float | None]) -> list[float]:
    """Finite samples; ``None`` (not measured) and NaN are left out, never counted as zero."""
    return [float(x) for x in samples if x is not None and math.isfinite(float(x))]


def t_interval(samples: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Student-t confidence interval of the mean. Needs at least 2 samples."""
    from scipy.stats import t as student_t

    xs = _clean(samples)
    if len(xs) < 2:
        raise ValueError(f"a t interval needs at least 2 samples, got {len(xs)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = statistics.fmean(xs)
    half = float(student_t.ppf((1 + confidence) / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean - half, mean + half


def bootstrap_interval(
    samples: Sequence[float],
    *,
    statistic: Callable[[Sequence[float]], float] = statistics.median,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic``; deterministic for a given ``seed``."""
    import numpy as np

    xs = np.asarray(_clean(samples), dtype=float)
    if len(xs) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 samples, got {len(xs)}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xs), size=(n_resamples, len(xs)))
    if statistic is statistics.median:  # vectorised fast path for the default
        stats = np.median(xs[idx], axis=1)
    else:
        stats = np.array([statistic(list(row)) for row in xs[idx]])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Summary:
    """Mean, median and a confidence interval of one metric over repeats."""

    n: int
    mean: float | None
    median: float | None
    stdev: float | None
    ci_low: float | None
    ci_high: float | None
    method: str
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        return cls(**data)


def summarize(
    samples: Sequence[float | None],
    *,
    method: CIMethod = "t",
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Summary:
    """Summary of a metric's samples. Unmeasured samples (None) are dropped; none at all gives n=0."""
    xs = _clean(samples)
    if not xs:
        return Summary(0, None, None, None, None, None, method, confidence)
    mean, median = statistics.fmean(xs), statistics.median(xs)
    if len(xs) < 2:
        return Summary(1, mean, median, None, None, None, method, confidence)
    if method == "t":
        lo, hi = t_interval(xs, confidence)
    elif method == "bootstrap":
        lo, hi = bootstrap_interval(xs, confidence=confidence, seed=seed)
    else:
        raise ValueError(f"unknown CI method {method!r}; use 't' or 'bootstrap'")
    return Summary(len(xs), mean, median, statistics.stdev(xs), lo, hi, method, confidence)


def mlperf_time_to_quality(times_s: Sequence[float | None]) -> float | None:
    """MLPerf aggregation: drop the fastest and the slowest run, average the rest.

    ``None`` is a run that never reached the target. MLPerf needs every run to converge, so any ``None``
    makes the result ``None`` (reported as "did not reach the target"), never a number of the lucky runs.
    """
    if any(t is None for t in times_s):
        return None
    xs = sorted(_clean(times_s))
    if len(xs) < 3:
        raise ValueError(f"time-to-quality needs at least 3 runs (drop best and worst), got {len(xs)}")
    return statistics.fmean(xs[1:-1])


def intervals_overlap(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool:
    """Whether two closed intervals overlap. A missing interval counts as overlapping (no evidence)."""
    if None in a or None in b:
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def percentile(samples: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); None when empty."""
    xs = sorted(_clean(samples))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio_summary(
    numerators: Sequence[float | None],
    denominators: Sequence[float | None],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Summary:
    """The ratio A/B of two variants measured in interleaved rounds (round ``i`` gave ``numerators[i]`` and
    ``denominators[i]``): median, mean and stdev of the per-round ratios, and a percentile-bootstrap CI of
    their median (rounds resampled whole, so drift that hit both variants of a round cancels).

    A round where either side was not measured (None/NaN) or B is 0 is left out."""
    if len(numerators) != len(denominators):
        raise ValueError(f"a paired ratio needs as many numerators as denominators, got {len(numerators)} "
                         f"and {len(denominators)}")
    ratios = [float(a) / float(b) for a, b in zip(numerators, denominators)
              if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
              and float(b) != 0]
    method = "bootstrap-paired-ratio"
    if not ratios:
        return Summary(0, None, None, None, None, None, method, confidence)
    mean, median = statistics.fmean(ratios), statistics.median(ratios)
    if len(ratios) < 2:
        return Summary(1, mean, median, None, None, None, method, confidence)
    lo, hi = bootstrap_interval(ratios, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return Summary(len(ratios), mean, median, statistics.stdev(ratios), lo, hi, method, confidence)


def medians(runs: Sequence[dict]) -> dict[str, float | None]:
    """The median of every numeric figure over repeated runs (dicts of one load or one run each)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)] if runs else []
    out: dict[str, float | None] = {}
    for k in keys:
        vals = _clean([r.get(k) for r in runs if isinstance(r.get(k), (int, float))])
        out[k] = statistics.median(vals) if vals else None
    return out
