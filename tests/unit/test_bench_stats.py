"""CI maths on known samples, checked against scipy.stats; bootstrap determinism; MLPerf aggregation."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from aifactory.bench.stats import (
    bootstrap_interval, intervals_overlap, mlperf_time_to_quality, percentile, summarize, t_interval,
)

SAMPLE = [10.0, 12.0, 14.0, 16.0, 18.0]


def test_t_interval_matches_hand_computation_and_scipy():
    lo, hi = t_interval(SAMPLE)
    # mean 14, s = sqrt(10), t(0.975, 4) = 2.7764451
    half = 2.7764451052 * math.sqrt(10) / math.sqrt(5)
    assert lo == pytest.approx(14 - half, rel=1e-9) and hi == pytest.approx(14 + half, rel=1e-9)
    ref = sps.t.interval(0.95, len(SAMPLE) - 1, loc=np.mean(SAMPLE), scale=sps.sem(SAMPLE))
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("sample,conf", [([1.2, 0.9, 1.4], 0.95), ([101.0, 99.5, 100.2, 98.7, 103.1, 100.0], 0.9),
                                         ([3.0, 3.0, 3.5], 0.99)])
def test_t_interval_matches_scipy_on_other_samples(sample, conf):
    ref = sps.t.interval(conf, len(sample) - 1, loc=np.mean(sample), scale=sps.sem(sample))
    assert t_interval(sample, conf) == pytest.approx(ref, rel=1e-12)


def test_t_interval_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def test_bootstrap_is_deterministic_for_a_seed_and_changes_with_it():
    rng = np.random.default_rng(7)
    xs = list(rng.normal(50, 5, size=40))
    a = bootstrap_interval(xs, seed=3)
    assert a == bootstrap_interval(xs, seed=3)
    assert a != bootstrap_interval(xs, seed=4)
    assert a[0] < statistics.median(xs) < a[1]


def test_bootstrap_of_the_mean_agrees_with_the_t_interval_on_a_large_normal_sample():
    xs = list(np.random.default_rng(1).normal(10, 2, size=400))
    b = bootstrap_interval(xs, statistic=statistics.fmean, seed=0, n_resamples=2000)
    t = t_interval(xs)
    assert b == pytest.approx(t, rel=0.02)


def test_summarize_drops_unmeasured_samples_and_reports_no_ci_for_one():
    s = summarize([10.0, None, 12.0, float("nan"), 14.0])
    assert (s.n, s.mean, s.median) == (3, 12.0, 12.0)
    assert s.ci_low < 12.0 < s.ci_high
    one = summarize([5.0, None])
    assert one.n == 1 and one.ci_low is None
    assert summarize([None, None]).n == 0
    assert summarize(SAMPLE, method="bootstrap").method == "bootstrap"
    with pytest.raises(ValueError, match="unknown CI method"):
        summarize(SAMPLE, method="jackknife")  # type: ignore[arg-type]


def test_mlperf_drops_best_and_worst():
    assert mlperf_time_to_quality([50.0, 10.0, 30.0, 40.0, 20.0]) == pytest.approx(30.0)
    assert mlperf_time_to_quality([100.0, 1.0, 7.0]) == 7.0  # an outlier on either side does not count
    assert mlperf_time_to_quality([10.0, None, 12.0]) is None  # a run that never converged
    with pytest.raises(ValueError, match="at least 3"):
        mlperf_time_to_quality([1.0, 2.0])


def test_percentile_matches_numpy():
    xs = list(np.random.default_rng(0).exponential(20, size=101))
    for q in (50, 95, 99, 0, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert percentile([], 50) is None


def test_interval_overlap():
    assert intervals_overlap((1, 2), (2, 3))
    assert not intervals_overlap((1, 2), (2.1, 3))
    assert intervals_overlap((None, None), (5, 6))  # no interval: no evidence of a difference
