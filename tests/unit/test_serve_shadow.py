"""Shadow traffic decisions: the deterministic sample, the spend cap that stops the shadow, the paired report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aifactory.bench.stats import percentile
from aifactory.exceptions import ConfigError
from aifactory.serve.shadow import (
    ShadowBudget, ShadowPair, ShadowReport, ShadowSpend, ShadowUsage, in_shadow_sample, token_f1,
)

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def test_sample_of_10_percent_over_10000_ids_is_within_a_point_and_nested():
    ids = [f"req-{i:05d}" for i in range(10_000)]
    ten = [i for i in ids if in_shadow_sample(i, 0.10)]
    five = [i for i in ids if in_shadow_sample(i, 0.05)]
    assert abs(len(ten) / len(ids) - 0.10) <= 0.01
    assert abs(len(five) / len(ids) - 0.05) <= 0.01
    assert set(five) <= set(ten)  # raising the fraction adds requests, never swaps them
    assert not any(in_shadow_sample(i, 0.0) for i in ids[:500]) and all(in_shadow_sample(i, 1.0) for i in ids[:500])
    with pytest.raises(ConfigError, match="fraction"):
        in_shadow_sample("r", 1.5)


def test_sample_is_the_same_in_every_process():
    """A replica restarted (or another replica) mirrors the same requests: no random, no salted hash()."""
    code = ("import json, sys; from aifactory.serve.shadow import in_shadow_sample; "
            "print(json.dumps([in_shadow_sample(f'id-{i}', 0.3) for i in range(2000)]))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    runs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    here = [in_shadow_sample(f"id-{i}", 0.3) for i in range(2000)]
    assert json.loads(runs[0]) == json.loads(runs[1]) == here


def test_budget_sends_up_to_the_cap_then_stops_itself_and_says_why_and_when():
    budget = ShadowBudget(price=lambda u: 0.01 * u.requests, max_usd_per_day=0.10)
    sent = 0
    for i in range(15):
        charge = budget.admit(ShadowUsage(), now=NOW + i, request_id=f"r{i}")
        if charge is None:
            continue
        sent += 1
        budget.settle(charge, ShadowUsage(), now=NOW + i + 0.5)
    assert sent == 10  # the 11th would have made $0.11 > $0.10: not sent
    s = budget.state
    assert budget.stopped and s.stopped_at == NOW + 10 and s.spent_usd == pytest.approx(0.10)
    assert "request r10 would pass max_usd_per_day $0.1" in s.stop_reason
    # stopped for good: a new UTC day does not restart it, and the state round-trips through JSON
    assert budget.admit(ShadowUsage(), now=NOW + 86_400) is None
    again = ShadowBudget(price=budget.price, state=ShadowSpend.model_validate_json(s.model_dump_json()))
    assert again.stopped and again.state.stop_reason == s.stop_reason


def test_requests_in_flight_reserve_their_estimate_and_settle_at_their_actual_price():
    per_token = lambda u: 1e-4 * (u.prompt_tokens + u.completion_tokens)
    budget = ShadowBudget(price=per_token, max_usd_per_day=0.05)
    estimate = ShadowUsage(prompt_tokens=100, completion_tokens=100)  # $0.02 at most
    a = budget.admit(estimate, now=NOW, request_id="a")
    b = budget.admit(estimate, now=NOW, request_id="b")
    assert a and b and budget.state.reserved_usd == pytest.approx(0.04)
    assert budget.admit(estimate, now=NOW, request_id="c") is None  # 0.04 in flight + 0.02 > 0.05
    assert budget.state.stopped_at == NOW and "$0.040000 in flight" in budget.state.stop_reason

    # settled below its estimate, a request frees the rest of its reservation for the next ones
    fresh = ShadowBudget(price=per_token, max_usd_per_day=0.05)
    a = fresh.admit(estimate, now=NOW, request_id="a")
    assert fresh.settle(a, ShadowUsage(prompt_tokens=100, completion_tokens=20), now=NOW) == pytest.approx(0.012)
    assert fresh.state.reserved_usd == pytest.approx(0) and fresh.state.spent_usd == pytest.approx(0.012)
    b = fresh.admit(estimate, now=NOW, request_id="b")  # 0.012 + 0.02 <= 0.05
    assert b is not None and not fresh.stopped
    fresh.settle(b, estimate, now=NOW)
    # the cap is per UTC day: the next day's spend starts from zero
    tomorrow = NOW + 86_400
    c = fresh.admit(estimate, now=tomorrow, request_id="c")
    assert c is not None and fresh.state.spent_usd == 0 and fresh.state.day == "2027-01-16"
    assert fresh.state.total_usd == pytest.approx(0.032)


@pytest.mark.parametrize("bad", [float("nan"), -0.01, None, "0.01"])
def test_a_price_that_is_not_a_finite_amount_raises_instead_of_metering_a_guess(bad):
    budget = ShadowBudget(price=lambda u: bad, max_usd_per_day=1.0)
    with pytest.raises(ConfigError, match="a price must be a finite number"):
        budget.admit(ShadowUsage(), now=NOW)
    assert budget.state.num_sent == 0 and not budget.stopped


def test_token_f1_counts_shared_whitespace_tokens_as_a_multiset():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    # shared: "the", "cat" (2); precision 2/4, recall 2/3 -> F1 = 2 * 0.5 * 0.667 / 1.167 = 4/7
    assert token_f1("the cat sat", "the cat the dog") == pytest.approx(4 / 7)
    assert token_f1("a a a", "a") == pytest.approx(0.5)  # one "a" shared: precision 1, recall 1/3
    assert token_f1("a a b", "a a c") == pytest.approx(2 / 3)  # both "a"s count, not the one word "a"
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_report_of_paired_records_gives_both_sides_and_their_agreement():
    pairs = []
    for i in range(200):
        stable_out = f"answer {i} is fine"
        shadow_out = stable_out if i % 4 else f"answer {i} is wrong"  # 1 in 4 differ by one token of four
        shadow_ok = i % 50 != 7  # 4 shadow failures; their partial text is kept but never counted as agreement
        pairs.append(ShadowPair(request_id=f"r{i}", stable_output=stable_out,
                                shadow_output=shadow_out, stable_ok=True, shadow_ok=shadow_ok,
                                stable_latency_s=0.010 + 0.0001 * i, shadow_latency_s=0.020 + 0.0002 * i,
                                stable_quality=0.8 if i < 40 else None, shadow_quality=0.7 if i < 40 else None))
    rep = ShadowReport.from_pairs(pairs, app="completions", stable_version="v1", shadow_version="v2", cost_usd=0.25)
    assert rep.num_pairs == 200 and rep.num_compared == 196
    assert rep.stable.error_rate == 0 and rep.shadow.error_rate == pytest.approx(4 / 200)
    assert rep.shadow.p99_s == pytest.approx(percentile([p.shadow_latency_s for p in pairs], 99))
    assert rep.stable.p50_s == pytest.approx(percentile([p.stable_latency_s for p in pairs], 50))
    compared = [p for p in pairs if p.shadow_ok]
    differ = sum(1 for p in compared if p.stable_output != p.shadow_output)
    assert rep.exact_match == pytest.approx(1 - differ / 196)
    assert rep.token_f1 == pytest.approx(1 - differ / 196 * (1 - 0.75))  # a differing pair shares 3 of 4 tokens
    assert rep.stable.quality == pytest.approx(0.8) and rep.shadow.quality_n == 40
    text = rep.to_text()
    assert "completions: shadow v2 vs stable v1, 200 mirrored requests, shadow cost $0.2500" in text
    assert any(line.startswith("stable") for line in text.splitlines())
    assert any(line.startswith("shadow") and "2.0%" in line and "0.700 (n=40)" in line for line in text.splitlines())
    assert f"exact {rep.exact_match:.1%}, token F1 {rep.token_f1:.3f}" in text
    assert ShadowReport.model_validate(json.loads(json.dumps(rep.model_dump()))) == rep
    with pytest.raises(ConfigError, match="r3"):
        ShadowReport.from_pairs(pairs + [pairs[3]])
