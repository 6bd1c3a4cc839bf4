"""The regression rule, the Pareto front, the SLO recommendation, pricing of outcomes, records and reports."""

import pytest

from aifactory.bench.analysis import pareto_front, recommend_serving, recommend_training, summarize_configs
from aifactory.bench.compare import compare, compare_runs, judge
from aifactory.bench.outcomes import price_outcomes
from aifactory.bench.report import write_report
from aifactory.bench.results import ResultStore, RunRecord, TrialRecord
from aifactory.cost.pricebook import load_price_book
from aifactory.exceptions import FactoryError, NotFound
from aifactory.home import FactoryHome


def _trials(config_id: str, samples: dict[str, list], *, run_id="r", kind="serve-mlp", knobs=None):
    n = len(next(iter(samples.values())))
    return [TrialRecord(run_id=run_id, spec_name="s", kind=kind, tenant="t", config_id=config_id,
                        knobs=knobs or {"max_batch_size": 1}, repeat=i, seed=i, status="ok",
                        metrics={k: v[i] for k, v in samples.items()}) for i in range(n)]


def _summary(config_id, **samples):
    return summarize_configs(_trials(config_id, samples), family="serving")


# ---- the regression rule ------------------------------------------------------------------------------

def test_worse_beyond_threshold_with_disjoint_cis_is_a_regression_naming_the_metric():
    base = _summary("a", throughput_rps=[200, 202, 198], p99_ms=[100, 101, 99])
    cand = _summary("a", throughput_rps=[150, 151, 149], p99_ms=[100, 102, 99])
    result = compare(base, cand, threshold=0.05)
    assert [(c.config_id, c.metric) for c in result.regressions] == [("a", "throughput_rps")]
    reg = result.regressions[0]
    assert reg.change_pct == pytest.approx(-25.0)
    assert "throughput_rps" in reg.describe() and "higher is better" in reg.describe()


def test_lower_is_better_metrics_regress_upwards():
    base = _summary("a", p99_ms=[100, 101, 99])
    cand = _summary("a", p99_ms=[130, 131, 129])
    assert [c.metric for c in compare(base, cand).regressions] == ["p99_ms"]
    assert [c.metric for c in compare(cand, base).improvements] == ["p99_ms"]


def test_overlapping_cis_are_noise_not_a_regression():
    base = _summary("a", p99_ms=[100, 60, 140])
    cand = _summary("a", p99_ms=[120, 80, 160])  # median +20%, intervals overlap
    result = compare(base, cand)
    assert result.regressions == []
    assert {c.verdict for c in result.changes if c.metric == "p99_ms"} == {"within noise"}


def test_small_moves_are_within_threshold_even_when_cis_are_disjoint():
    assert judge(direction="lower", base_median=100, cand_median=103, base_ci=(99.9, 100.1), cand_ci=(102.9, 103.1),
                 threshold=0.05) == "within threshold"
    assert judge(direction="lower", base_median=100, cand_median=103, base_ci=(99.9, 100.1), cand_ci=(102.9, 103.1),
                 threshold=0.02) == "regression"


def test_configurations_in_one_run_only_are_listed_not_compared():
    result = compare(_summary("a", p99_ms=[1, 2, 3]), _summary("b", p99_ms=[1, 2, 3]))
    assert result.changes == [] and result.only_in_baseline == ["a"] and result.only_in_candidate == ["b"]


def test_compare_refuses_bad_threshold_and_unknown_metric():
    s = _summary("a", p99_ms=[1, 2, 3])
    with pytest.raises(FactoryError, match="threshold"):
        compare(s, s, threshold=-1)
    with pytest.raises(FactoryError, match="unknown metric"):
        compare(s, s, metrics=["p42_ms"])


# ---- Pareto front and recommendation ----------------------------------------------------------------

def test_pareto_front():
    points = [
        {"id": "a", "thr": 100, "p99": 50},
        {"id": "b", "thr": 200, "p99": 80},
        {"id": "c", "thr": 150, "p99": 90},   # dominated by b
        {"id": "d", "thr": 90, "p99": 60},    # dominated by a
        {"id": "e", "thr": None, "p99": 10},  # unmeasured: not on the front
        {"id": "f", "thr": 200, "p99": 80},   # equal to b: neither dominates
    ]
    front = pareto_front(points, {"thr": "higher", "p99": "lower"})
    assert sorted(p["id"] for p in front) == ["a", "b", "f"]


def _serving_summaries():
    return (
        _summary("cheap-slow", p99_ms=[400, 410, 405], throughput_rps=[300, 300, 300],
                 cost_per_1k_requests_usd=[0.01, 0.01, 0.01], error_rate=[0, 0, 0])
        + _summary("fast-costly", p99_ms=[50, 52, 51], throughput_rps=[200, 200, 200],
                   cost_per_1k_requests_usd=[0.05, 0.05, 0.05], error_rate=[0, 0, 0])
        + _summary("fast-cheap", p99_ms=[90, 95, 92], throughput_rps=[250, 251, 249],
                   cost_per_1k_requests_usd=[0.02, 0.02, 0.02], error_rate=[0, 0, 0])
        + _summary("fast-failing", p99_ms=[10, 10, 10], throughput_rps=[900, 900, 900],
                   cost_per_1k_requests_usd=[0.001, 0.001, 0.001], error_rate=[0.1, 0.1, 0.1])
    )


def test_recommendation_is_the_cheapest_configuration_meeting_the_slo():
    rec = recommend_serving(_serving_summaries(), p99_ms=100)
    assert rec.config_id == "fast-cheap" and "lowest median cost" in rec.reason
    assert recommend_serving(_serving_summaries(), p99_ms=1000).config_id == "cheap-slow"
    none = recommend_serving(_serving_summaries(), p99_ms=5)
    assert none.config_id is None and "5 ms" in none.reason


def test_recommendation_without_costs_says_so_and_uses_throughput():
    sums = _summary("x", p99_ms=[50, 51, 52], throughput_rps=[100, 100, 100]) + \
        _summary("y", p99_ms=[60, 61, 62], throughput_rps=[150, 150, 150])
    rec = recommend_serving(sums, p99_ms=100)
    assert rec.config_id == "y" and "costs unavailable" in rec.reason


def test_training_recommendation_uses_the_mlperf_aggregate():
    fast = _trials("fast", {"time_to_quality_s": [10, 11, 100], "cost_per_validated_checkpoint_usd": [2, 2, 2]},
                   kind="train-mlp")
    cheap = _trials("cheap", {"time_to_quality_s": [20, 21, 22], "cost_per_validated_checkpoint_usd": [1, 1, 1]},
                    kind="train-mlp")
    sums = summarize_configs(fast + cheap, family="training")
    assert sums[0].time_to_quality_mlperf_s == 11  # the 100 s outlier is dropped
    assert recommend_training(sums, time_to_quality_s=60).config_id == "cheap"
    assert recommend_training(sums, time_to_quality_s=15).config_id == "fast"


# ---- pricing of outcomes ----------------------------------------------------------------------------

def test_cost_per_1k_requests_from_the_price_book():
    book = load_price_book()
    rate = book.rate("cpu", "cpu", "local").on_demand_usd_per_hour
    out = price_outcomes({"num_ok": 500, "replica_cpu_s": 10.0, "energy_j": None, "energy_note": "no GPU"},
                         family="serving", book=book, region="local", tenant="t")
    assert out["cost_per_1k_requests_usd"] == pytest.approx(10.0 / 3600 * rate / 500 * 1000)
    assert out["requests_per_usd"] == pytest.approx(500 / (10.0 / 3600 * rate))
    assert out["requests_per_joule"] is None and out["unavailable"]["requests_per_joule"] == "no GPU"


def test_without_a_price_book_costs_are_unavailable_not_zero():
    out = price_outcomes({"num_ok": 500, "replica_cpu_s": 10.0}, family="serving", book=None, region="local",
                         tenant="t", unavailable_reason="no price book")
    assert out["cost_per_1k_requests_usd"] is None and out["requests_per_usd"] is None
    assert out["unavailable"]["cost_per_1k_requests_usd"] == "no price book"


def test_cost_per_validated_checkpoint_needs_the_target_reached():
    book = load_price_book()
    reached = price_outcomes({"train_cpu_s": 20.0, "train_wall_s": 10.0, "time_to_quality_s": 5.0, "samples": 1000},
                             family="training", book=book, region="local", tenant="t")
    assert reached["cost_per_validated_checkpoint_usd"] == pytest.approx(reached["cost_usd"] / 2)
    missed = price_outcomes({"train_cpu_s": 20.0, "train_wall_s": 10.0, "time_to_quality_s": None, "samples": 1000},
                            family="training", book=book, region="local", tenant="t")
    assert missed["cost_per_validated_checkpoint_usd"] is None
    assert "not reached" in missed["unavailable"]["cost_per_validated_checkpoint_usd"]


# ---- records and reports --------------------------------------------------------------------------------

def _run(run_id: str, trials: list[TrialRecord], started: float) -> RunRecord:
    return RunRecord(run_id=run_id, spec_name="s", kind="serve-mlp", tenant="t", spec={"repeats": 3, "slo": {"p99_ms": 100}},
                     context={"code_version": "abc", "hardware": {"gpu_name": "none"}}, pricing={"price_book_version": "v"},
                     started_at=started, finished_at=started + 5, num_trials=len(trials), num_failed=0)


def test_store_round_trip_compare_and_report(tmp_path):
    store = ResultStore(FactoryHome.from_env(tmp_path))
    knobs = {"max_batch_size": 8}
    base_trials = _trials("a", {"throughput_rps": [200, 201, 199], "p99_ms": [80, 81, 79], "num_ok": [10, 10, 10],
                                "error_rate": [0, 0, 0]}, run_id="base", knobs=knobs)
    cand_trials = _trials("a", {"throughput_rps": [100, 101, 99], "p99_ms": [80, 82, 79], "num_ok": [10, 10, 10],
                                "error_rate": [0, 0, 0]}, run_id="cand", knobs=knobs)
    store.write(_run("base", base_trials, 1.0), base_trials)
    store.write(_run("cand", cand_trials, 2.0), cand_trials)
    assert [r.run_id for r in store.list()] == ["base", "cand"]
    run, trials = store.get()  # newest
    assert run.run_id == "cand" and trials == cand_trials and trials[0].schema_version == 2
    with pytest.raises(NotFound):
        store.get("nope")
    result = compare_runs(store.get("base"), store.get("cand"))
    assert [c.metric for c in result.regressions] == ["throughput_rps"]
    report = write_report(*store.get("base"), tmp_path / "rep")
    assert report.markdown_path.is_file() and "Recommendation" in report.text
    assert report.recommendation.config_id == "a"
    assert {p.name for p in report.images} == {"latency_vs_throughput.png", "cost_vs_p99.png", "pareto_front.png"}
    assert all(p.stat().st_size > 5000 for p in report.images)
