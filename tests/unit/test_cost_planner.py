"""Commitment planner: the optimum of a piecewise-linear cost is at a demand quantile (pure, no cluster)."""

import random

import pytest
from aifactory.cost.planner import Demand, demand_series, plan, total_cost
from aifactory.cost.records import UsageRecord


def test_steady_base_and_spikes_reserves_the_base():
    demand = [4.0] * 90 + [10.0] * 10  # spikes 10% of hours; r/o = 0.5: reserve what >50% of hours use
    p = plan(demand, reserved_usd_per_hour=1.0, on_demand_usd_per_hour=2.0)
    assert p.reserved_units == 4.0
    assert p.covered_percentile == pytest.approx(90.0)
    assert p.all_on_demand_usd == pytest.approx(2.0 * (360 + 100))
    assert p.total_usd == pytest.approx(400 + 2.0 * 60)
    assert p.savings_usd == pytest.approx(p.all_on_demand_usd - p.total_usd)


def test_picks_the_quantile_optimum_on_random_histories():
    rng = random.Random(7)
    for _ in range(50):
        demand = [rng.uniform(0, 20) for _ in range(rng.randint(5, 60))]
        r, o = rng.uniform(0.1, 1.0), 1.0
        p = plan(demand, reserved_usd_per_hour=r, on_demand_usd_per_hour=o)
        grid = [i / 100 for i in range(2001)]
        brute = min(total_cost(demand, R, reserved_usd_per_hour=r, on_demand_usd_per_hour=o) for R in grid)
        assert p.total_usd <= brute + 1e-9
        # at the optimum, at most r/o of the hours lie strictly above the reservation
        above = sum(1 for d in demand if d > p.reserved_units) / len(demand)
        assert above <= r / o + 1e-9


def test_reserved_no_cheaper_reserves_nothing_and_risk_of_a_20pct_drop():
    assert plan([3.0, 5.0], reserved_usd_per_hour=2.0, on_demand_usd_per_hour=2.0).reserved_units == 0.0
    p = plan([10.0] * 10, reserved_usd_per_hour=0.5, on_demand_usd_per_hour=1.0)
    assert p.reserved_units == 10.0
    assert p.drop_20pct_usd == pytest.approx(50.0)  # still paying for 10 reserved units
    assert p.drop_20pct_best_usd == pytest.approx(40.0)  # 8 reserved would do
    assert p.over_commitment_usd == pytest.approx(10.0)


def test_empty_history_says_so():
    with pytest.raises(ValueError, match="empty"):
        plan([], reserved_usd_per_hour=1.0, on_demand_usd_per_hour=2.0)


def _rec(t, q, *, dur=60.0, **kw):
    return UsageRecord(window_start=t, window_end=t + dur, tenant=kw.pop("tenant", "a"), resource="cpu",
                       sku="cpu", quantity_s=q, **kw)


def test_demand_series_from_records_of_one_pool_without_idle():
    records = [_rec(0, 3600 * 2, pool="p"), _rec(60, 3600, pool="p"), _rec(7200, 3600, pool="p", dur=3600),
               _rec(0, 3600 * 5, pool="p", tenant="idle"), _rec(0, 3600 * 9, pool="other")]
    d = demand_series(records, pool="p")
    assert d.units == (3.0, 0.0, 1.0)
    assert d.hours == (1.0, 1.0, 1.0)


def test_a_history_shorter_than_a_bucket_is_not_diluted():
    # 30 minutes of 2 CPUs held: demand is 2 units over 0.5 h, not 1 unit over an hour
    records = [_rec(600 + 60 * i, 120.0, pool="p") for i in range(30)]
    d = demand_series(records, pool="p")
    assert d.units == (pytest.approx(2.0),)
    assert d.hours == (pytest.approx(0.5),)
    p = plan(d, reserved_usd_per_hour=0.5, on_demand_usd_per_hour=1.0)
    assert p.reserved_units == pytest.approx(2.0)
    assert p.all_on_demand_usd == pytest.approx(1.0)  # 2 units x 0.5 h x $1
    assert p.total_usd == pytest.approx(0.5)


def test_known_optimum_is_the_weighted_quantile():
    # 60% of the hours at 1, 30% at 5, 10% at 9; r/o = 0.35: reserve while more than 35% of hours use the unit,
    # i.e. at 1 (100% of hours use it) and up to 5 (40% use it), not up to 9 (10%)
    demand = Demand(units=(1.0, 5.0, 9.0), hours=(6.0, 3.0, 1.0), start=0.0)
    p = plan(demand, reserved_usd_per_hour=0.35, on_demand_usd_per_hour=1.0)
    assert p.reserved_units == 5.0
    assert p.covered_percentile == pytest.approx(90.0)
    assert p.total_usd == pytest.approx(10 * 5 * 0.35 + 1 * 4 * 1.0)
    assert p.all_on_demand_usd == pytest.approx(6 + 15 + 9)
    # at r/o = 0.45 the unit from 1 to 5 is used 40% < 45% of hours: reserve only the base
    assert plan(demand, reserved_usd_per_hour=0.45, on_demand_usd_per_hour=1.0).reserved_units == 1.0


def test_a_20pct_drop_that_makes_the_commitment_lose_money():
    p = plan([10.0] * 10, reserved_usd_per_hour=0.9, on_demand_usd_per_hour=1.0)
    assert p.reserved_units == 10.0
    assert p.drop_20pct_usd == pytest.approx(90.0)
    assert p.drop_20pct_savings_usd == pytest.approx(80.0 - 90.0)  # all on-demand at 8 units is cheaper


def test_cli_plan_reads_the_ledger_and_writes_the_chart(tmp_path):
    import json
    import subprocess
    import sys

    from aifactory.cost.ledger import Ledger
    from aifactory.home import FactoryHome

    home = FactoryHome.from_env(tmp_path)
    hours = [2.0] * 20 + [6.0] * 4
    Ledger.of(home).append([_rec(h * 3600.0, d * 3600, dur=3600, pool="data-cpu") for h, d in enumerate(hours)])
    out = subprocess.run([sys.executable, "-m", "aifactory.cli", "costs", "plan", "--pool", "data-cpu",
                          "--format", "json"], check=False, capture_output=True, text=True, timeout=60,
                         env={"AIFACTORY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["reserved_units"] == 2.0  # packaged book: reserved 0.030 / on-demand 0.048 per CPU-hour
    assert row["covered_percentile"] == pytest.approx(100 * 20 / 24, abs=1e-4)
    assert (tmp_path / "reports" / "plan-data-cpu-cpu.png").stat().st_size > 0


def test_cli_plan_bursts_on_spot_when_asked(tmp_path):
    import json
    import subprocess
    import sys

    from aifactory.cost.ledger import Ledger
    from aifactory.home import FactoryHome

    home = FactoryHome.from_env(tmp_path)
    (tmp_path / "pricebook.yaml").write_text(
        "version: t1\nrates:\n"
        "- {resource: cpu, sku: cpu, on_demand_usd_per_hour: 1.0, reserved_usd_per_hour: 0.5, spot_usd_per_hour: 0.4}\n"
        "- {resource: memory, sku: gib, on_demand_usd_per_hour: 0.0}\n")
    Ledger.of(home).append([_rec(h * 3600.0, d * 3600, dur=3600, pool="p") for h, d in enumerate([2.0, 2.0, 4.0])])
    env = {"AIFACTORY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run(*extra):
        out = subprocess.run([sys.executable, "-m", "aifactory.cli", "costs", "plan", "--pool", "p", "--format",
                              "json", *extra], check=False, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)[0]

    assert run()["reserved_units"] == 2.0  # r/o = 0.5: the unit above 2 is used 1/3 of hours
    spot = run("--burst", "spot")  # r/spot = 1.25 > 1: reserving never pays
    assert spot["reserved_units"] == 0.0 and spot["burst"] == "spot"
    assert spot["total_usd"] == pytest.approx(0.4 * 8)
