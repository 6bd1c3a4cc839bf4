"""Money paths that must survive failures: a commit that raises, a sampling outage, a bad budgets file."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import replace

import pytest

from aifactory.config import parse_config
from aifactory.cost.attribution import CapacityPoint, Holding, Tracker, attribute, totals_by
from aifactory.cost.budgets import Budget, BudgetsConfig, TenantLimits, load_budgets, save_budgets
from aifactory.cost.pricebook import parse_price_book
from aifactory.cost.records import UNKNOWN
from aifactory.cost.sampler import Snapshot
from aifactory.exceptions import ConfigError
from aifactory.home import FactoryHome

CPU = ("cpu", "cpu")
CAP = {CPU: 4.0}


def _core(tmp_path, *, cursor=72.0):
    """A CollectorCore on a ledger in ``tmp_path``, sampling every 3 s into 6 s windows; no Ray."""
    from aifactory.cost.collector import CollectorConfig, CollectorCore

    core = CollectorCore(CollectorConfig(ledger_path=str(tmp_path / "ledger.sqlite"), sample_interval_s=3.0,
                                         window_s=6.0))
    if cursor is not None:
        core.cursor = cursor
    return core


def _feed(core, monkeypatch, snapshots, *, failures=()):
    """Step ``core`` once per snapshot; the steps in ``failures`` are expected to raise."""
    import aifactory.cost.sampler as sampler

    it = iter(snapshots)
    monkeypatch.setattr(sampler, "take_snapshot", lambda *a, **kw: next(it))
    raised = 0
    for _ in snapshots:
        try:
            core.step()
        except OSError:
            raised += 1
    assert raised == len(failures)


def _by_tenant(records):
    out = defaultdict(float)
    for r in records:
        out[r.tenant] += r.quantity_s
    return dict(out)


def _per_window(records):
    out = defaultdict(float)
    for r in records:
        out[r.window_start] += r.quantity_s
    return dict(out)


# ---- a failed commit loses nothing --------------------------------------------------------------------

def _snapshots():
    short = Holding("job:a", "alpha", {CPU: 1.0}, start=72.0, job_id="a")
    ended = replace(short, end=76.0)  # Ray reports its end, inside the window [72, 78)
    long = Holding("job:b", "beta", {CPU: 2.0}, start=72.0, job_id="b")
    snaps = []
    for t in range(72, 106, 3):
        held = [long] + ([short] if t < 76 else [ended] if t < 90 else [])
        snaps.append(Snapshot(t=float(t), capacity=CAP, holdings=held))
    return snaps


def test_a_commit_that_raises_is_retried_with_the_same_totals(tmp_path, monkeypatch):
    clean = _core(tmp_path / "clean")
    _feed(clean, monkeypatch, _snapshots())
    expected = clean.ledger.usage()

    core = _core(tmp_path / "flaky")
    real, calls = core.ledger.commit_window, []

    def flaky(*args, **kwargs):
        calls.append(kwargs["cursor"])
        if len(calls) == 1:
            raise OSError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(core.ledger, "commit_window", flaky)
    _feed(core, monkeypatch, _snapshots(), failures=[0])
    got = core.ledger.usage()
    assert calls[:2] == [78.0, 78.0]  # the window that failed was written next time
    assert core.cursor == clean.cursor == 96.0
    assert _by_tenant(got) == pytest.approx(_by_tenant(expected))
    assert _by_tenant(got)["alpha"] == pytest.approx(4.0)  # job:a's 4 s, in the window whose commit failed
    assert _per_window(got) == pytest.approx({w: 24.0 for w in (72.0, 78.0, 84.0, 90.0)})


# ---- an outage is unknown, not billed -----------------------------------------------------------------

def test_outage_gap_is_unknown_not_billed_at_the_midpoint():
    tr = Tracker(max_gap_s=30.0)
    actor = Holding("actor:a", "alpha", {CPU: 1.0}, job_id="a")  # Ray gives no start or end for it
    for t in (0.0, 10.0, 20.0):
        tr.observe(t, [actor])
    tr.observe(200.0, [Holding("actor:c", "gamma", {CPU: 1.0}, job_id="c")])  # after a 180 s outage
    tr.observe(210.0, [Holding("actor:c", "gamma", {CPU: 1.0}, job_id="c")])
    recs = attribute(tr.holdings(), [CapacityPoint(0.0, {CPU: 2.0})], 0.0, 240.0)
    t = totals_by(recs)
    # billed only where a sample saw them (the midpoint would bill each 90 s of the gap)
    assert t[("alpha", "cpu")] == pytest.approx(20.0)
    assert t[("gamma", "cpu")] == pytest.approx(40.0)
    unknown = {r.holder: r.quantity_s for r in recs if r.tenant == UNKNOWN}
    assert unknown == {"actor:a": pytest.approx(180.0), "actor:c": pytest.approx(180.0)}
    # tenants + unattributed + idle + unknown = capacity x time
    assert sum(r.quantity_s for r in recs) == pytest.approx(2.0 * 240.0)


def test_holder_seen_again_after_an_outage_has_no_unknown_gap():
    tr = Tracker(max_gap_s=30.0)
    job = Holding("job:x", "alpha", {CPU: 1.0}, start=0.0)
    tr.observe(0.0, [job])
    tr.observe(100.0, [])  # a partial answer after the outage: the job seems gone
    tr.observe(110.0, [job])  # it never stopped
    recs = attribute(tr.holdings(), [CapacityPoint(0.0, {CPU: 1.0})], 0.0, 120.0)
    assert totals_by(recs) == {("alpha", "cpu"): pytest.approx(120.0)}


def test_restarted_collector_records_the_outage_as_unknown(tmp_path, monkeypatch):
    actor = Holding("actor:a", "alpha", {CPU: 1.0})  # no start or end from Ray
    before = [Snapshot(t=float(t), capacity=CAP, holdings=[actor]) for t in range(72, 91, 3)]
    core = _core(tmp_path)
    _feed(core, monkeypatch, before)
    assert core.cursor == 84.0
    # the collector dies after t=90; a new one starts at t=150, when the actor is gone
    restarted = _core(tmp_path, cursor=None)
    assert restarted.cursor == 84.0 and restarted.tracker.max_gap_s == 9.0
    _feed(restarted, monkeypatch, [Snapshot(t=float(t), capacity=CAP, holdings=[]) for t in range(150, 169, 3)])
    recs = restarted.ledger.usage()
    alpha, unknown = _by_tenant(recs)["alpha"], _by_tenant(recs)[UNKNOWN]
    # the state committed with the window [78, 84) last saw the actor at t=90; from there to the sample
    # t=150 nobody knows when it ended (the midpoint would bill alpha 30 s of that)
    assert alpha == pytest.approx(90.0 - 72.0)
    assert unknown == pytest.approx(150.0 - 90.0)
    assert {r.holder for r in recs if r.tenant == UNKNOWN} == {"actor:a"}
    assert all(v == pytest.approx(24.0) for v in _per_window(recs).values())


# ---- budgets and prices are finite; budgets.yaml is replaced atomically ----------------------------------

@pytest.mark.parametrize("value", [float("inf"), float("nan"), "1e400", float("-inf")])
@pytest.mark.parametrize("field", ["budget.hard_usd", "budget.soft_usd", "quota.gpu"])
def test_non_finite_budget_numbers_are_refused_naming_the_field(field, value):
    section, name = field.split(".")
    with pytest.raises(ConfigError, match=rf"tenants\.search\.{section}\.{name}: Input should be a finite number"):
        parse_config(BudgetsConfig, {"tenants": {"search": {section: {name: value}}}}, source="budgets.yaml")


def test_budgets_file_with_inf_is_refused_on_load(tmp_path):
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    (home.root / "budgets.yaml").write_text("tenants:\n  search:\n    budget: {hard_usd: .inf}\n")
    with pytest.raises(ConfigError, match=r"tenants\.search\.budget\.hard_usd: Input should be a finite number"):
        load_budgets(home)


@pytest.mark.parametrize("rates,pools,field", [
    ([{"resource": "gpu", "sku": "H100", "on_demand_usd_per_hour": float("inf")}], {},
     "rates.2.on_demand_usd_per_hour"),
    ([{"resource": "gpu", "sku": "H100", "on_demand_usd_per_hour": 2.0, "spot_usd_per_hour": float("nan")}], {},
     "rates.2.spot_usd_per_hour"),
    ([], {"gpu-a": {"rates": [{"resource": "gpu", "sku": "H100", "usd_per_hour": "1e400"}]}},
     "pools.gpu-a.rates.0.usd_per_hour"),
])
def test_non_finite_prices_are_refused_naming_the_field(rates, pools, field):
    base = [{"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 0.04},
            {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.005}]
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
        parse_price_book({"version": "t", "rates": base + rates, "pools": pools})


def _budgets(hard_usd: float) -> BudgetsConfig:
    return BudgetsConfig(tenants={"search": TenantLimits(budget=Budget(hard_usd=hard_usd))})


def test_save_budgets_replaces_the_file_atomically(tmp_path, monkeypatch):
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    save_budgets(home, _budgets(100.0))
    assert load_budgets(home).tenants["search"].budget.hard_usd == 100.0

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_budgets(home, _budgets(50.0))
    monkeypatch.undo()
    assert load_budgets(home).tenants["search"].budget.hard_usd == 100.0  # the old file, whole
    assert sorted(p.name for p in home.root.iterdir() if "budgets" in p.name) == ["budgets.yaml"]  # no temp left
    # a config built around validation is not written either: the file must always read back
    bad = BudgetsConfig.model_construct(tenants={"search": TenantLimits.model_construct(
        budget=Budget.model_construct(period="month", soft_usd=None, hard_usd=float("inf")), quota=None)},
        live_max_age_s=120.0)
    with pytest.raises(ConfigError, match="hard_usd"):
        save_budgets(home, bad)
    assert load_budgets(home).tenants["search"].budget.hard_usd == 100.0
