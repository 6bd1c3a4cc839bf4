"""Saturation calibration of the overload benchmark, without Ray or HTTP: the decision and the search."""

from __future__ import annotations

import pytest

from aifactory.bench.loadgen import LoadResult, below_saturation, find_saturation


def _point(offered: float, **kw) -> dict:
    s = {"offered_rps": offered, "sent_rps": offered, "answered_rps": offered, "throughput_rps": offered,
         "num_rejected": 0, "num_errors": 0,
         "peak_in_flight": 5, "p99_ms": 50.0, "p50_first_half_ms": 20.0, "p50_second_half_ms": 25.0,
         "answers_per_half": 100}
    return s | kw


@pytest.mark.parametrize("kw,reason", [
    ({}, "keeps up"),
    ({"num_rejected": 3}, "3 rejected"),
    ({"sent_rps": 80.0}, "the generator sent 80 of 100"),
    ({"answered_rps": 70.0}, "answered 70.0 of 100.0"),
    ({"peak_in_flight": 48}, "filled the admission bound (48)"),
    ({"p50_second_half_ms": 400.0}, "median latency grew from 20 ms"),
    ({"p50_second_half_ms": 400.0, "answers_per_half": 5}, "keeps up"),  # too few answers to judge
])
def test_below_saturation_names_why_a_point_is_not(kw, reason):
    ok, why = below_saturation(_point(100.0, **kw), capacity=48)
    assert ok == (reason == "keeps up") and reason in why


def test_find_saturation_climbs_until_the_server_falls_behind_and_retries_one_noisy_point():
    capacity_rps = 130.0
    noisy = {124}  # the first measurement at 124.4 rps is disturbed (shared cores); its retry is clean

    def run_at(rate: float) -> dict:
        key = round(rate)
        if key in noisy:
            noisy.discard(key)
            return _point(rate, num_rejected=1)
        return _point(rate, answered_rps=min(rate, capacity_rps))

    s, points = find_saturation(run_at, start_rps=50.0, capacity=48, step=1.2, log=lambda m: None)
    assert s == pytest.approx(50 * 1.2 ** 5)  # 124.4 passes on its retry; 149.3 > 130 fails twice
    assert [round(p["offered_rps"], 1) for p in points][-4:] == [124.4, 124.4, 149.3, 149.3]
    assert [p["keeps_up"] for p in points][-4:] == [False, True, False, False]


def test_find_saturation_halves_when_even_the_start_is_too_fast():
    s, points = find_saturation(lambda r: _point(r, answered_rps=min(r, 30.0)), start_rps=100.0, capacity=48,
                                log=lambda m: None)
    assert s <= 30.0 and not points[0]["keeps_up"]
    with pytest.raises(RuntimeError, match="no open-loop rate"):
        find_saturation(lambda r: _point(r, num_rejected=1), start_rps=10.0, capacity=48, max_points=3,
                        log=lambda m: None)


def test_open_loop_summary_reports_halves_and_send_rate():
    r = LoadResult(offered_rps=10.0, send_s=0.9, wall_s=1.0, peak_in_flight=3)
    for i in range(10):
        r.record(i * 0.1, 0.01 if i < 5 else 0.1, 200)  # the second half is slower: a growing queue
    s = r.metrics()
    assert s["sent_rps"] == pytest.approx(10.0) and s["peak_in_flight"] == 3
    assert s["answered_rps"] == pytest.approx(9 / 0.99)  # answers from 0.01 s to 1.0 s
    assert s["p99_first_half_ms"] == pytest.approx(10.0) and s["p99_second_half_ms"] == pytest.approx(100.0)
    assert s["p50_first_half_ms"] == pytest.approx(10.0) and s["p50_second_half_ms"] == pytest.approx(100.0)
    assert s["answers_per_half"] == 5
