"""The ledger's idempotent writes, budgets and quotas, KPI maths: SQLite files, no cluster."""

import sqlite3
import time

import pytest

from aifactory.cost.admission import admit
from aifactory.cost.budgets import BudgetsConfig, budget_status, period_start, save_budgets
from aifactory.cost.kpis import cost_rows, kpis, parse_since
from aifactory.cost.ledger import Ledger
from aifactory.cost.pricebook import parse_price_book
from aifactory.cost.records import UsageRecord
from aifactory.exceptions import BudgetExceeded, ConfigError, MeterUnavailable, QuotaExceeded
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef, WorkloadKind

BOOK = parse_price_book({"version": "t", "rates": [
    {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 3.6},  # 0.001 USD per CPU-second
    {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.0},
]})


def rec(tenant="alpha", q=100.0, ws=None, **kw):
    ws = time.time() - 30 if ws is None else ws
    return UsageRecord(window_start=ws, window_end=ws + 10, tenant=tenant, resource="cpu", sku="cpu",
                       quantity_s=q, **kw)


@pytest.fixture
def home(tmp_path):
    return FactoryHome.from_env(tmp_path / "home").ensure()


def test_ledger_is_wal_and_idempotent(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    batch = [rec(q=1.0, ws=100.0), rec(tenant="beta", q=2.0, ws=100.0)]
    assert led.append(batch) == 2
    assert led.append(batch) == 0  # a restarted collector rewriting a window
    assert led.count() == 2
    assert sqlite3.connect(tmp_path / "l.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {r.tenant for r in led.usage(tenant="beta")} == {"beta"}
    assert led.usage(since=200.0) == []


def test_commit_window_is_atomic(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with led.transaction() as db:
            Ledger._insert_usage(db, [rec(ws=1.0)])
            raise Boom()
    assert led.count() == 0
    assert led.commit_window("c1", [rec(ws=1.0)], cursor=11.0, state={"x": 1}) == 1
    assert led.commit_window("c1", [rec(ws=1.0)], cursor=11.0, state={"x": 1}) == 0
    assert led.collector_state("c1") == (11.0, {"x": 1})
    assert led.collector_state("other") == (None, {})


def test_ledger_outlives_its_writer(tmp_path):
    Ledger(tmp_path / "l.sqlite").append([rec(ws=5.0, q=7.0)])
    again = Ledger(tmp_path / "l.sqlite")
    assert [r.quantity_s for r in again.usage()] == [7.0]


def test_budget_hard_limit_refuses_and_soft_limit_alerts(home):
    save_budgets(home, BudgetsConfig.model_validate(
        {"tenants": {"alpha": {"budget": {"period": "day", "soft_usd": 0.05, "hard_usd": 0.2}}}}))
    (home.root / "pricebook.yaml").write_text(
        "version: t\nrates:\n - {resource: cpu, sku: cpu, on_demand_usd_per_hour: 3.6}\n"
        " - {resource: memory, sku: gib, on_demand_usd_per_hour: 0}\n")
    led = Ledger.of(home)
    alpha = TenantRef(tenant="alpha")
    admit(home, alpha, {"CPU": 1}, WorkloadKind.TRAIN)  # nothing spent yet
    assert led.alerts() == []
    led.append([rec(q=100.0)])  # $0.10: over soft, under hard
    admit(home, alpha, {"CPU": 1}, WorkloadKind.TRAIN)
    assert [a["kind"] for a in led.alerts()] == ["budget_soft"]
    led.append([rec(q=150.0, ws=time.time() - 20)])  # $0.25 total
    with pytest.raises(BudgetExceeded) as err:
        admit(home, alpha, {"CPU": 1}, WorkloadKind.TRAIN)
    assert err.value.tenant == "alpha" and err.value.limit_usd == 0.2 and err.value.spent_usd == pytest.approx(0.25)
    # other tenants are unaffected; spending before the period does not count
    admit(home, TenantRef(tenant="beta"), {"CPU": 1}, WorkloadKind.TRAIN)
    rows = budget_status(home)
    assert rows[0]["state"] == "over-hard" and rows[0]["remaining_usd"] == pytest.approx(-0.05)


def test_quota_fails_closed_without_a_fresh_meter_and_counts_live_holdings(home):
    save_budgets(home, BudgetsConfig.model_validate({"tenants": {"alpha": {"quota": {"cpu": 4, "gpu": 0}}}}))
    alpha = TenantRef(tenant="alpha")
    # No meter has ever sampled: a request within the limit is refused (its holdings are unknown) ...
    with pytest.raises(MeterUnavailable, match="start the meter") as err:
        admit(home, alpha, {"CPU": 4, "GPU": 0}, WorkloadKind.OTHER)
    assert (err.value.tenant, err.value.resource, err.value.age_s) == ("alpha", "CPU", None)
    # ... a request over the limit by itself is a QuotaExceeded, meter or not
    with pytest.raises(QuotaExceeded) as err:
        admit(home, alpha, {"CPU": 5}, WorkloadKind.OTHER, lane="learning")
    assert (err.value.resource, err.value.requested, err.value.limit, err.value.lane) == ("CPU", 5.0, 4.0, "learning")
    assert "tenant='alpha', lane='learning', pool='all', resource='CPU', requested=5, held=0, limit=4" in str(err.value)
    with pytest.raises(QuotaExceeded, match="resource='GPU'"):
        admit(home, alpha, {"GPU": 1}, WorkloadKind.OTHER)
    admit(home, TenantRef(tenant="beta"), {"CPU": 64}, WorkloadKind.OTHER)  # no quota: no meter needed
    # A meter that sampled an empty cluster is fresh: nothing held
    Ledger.of(home).set_live("c1", {})
    admit(home, alpha, {"CPU": 4, "GPU": 0}, WorkloadKind.OTHER)
    Ledger.of(home).set_live("c1", {("alpha", "cpu"): 3.0, ("beta", "cpu"): 6.0})
    admit(home, alpha, {"CPU": 1}, WorkloadKind.OTHER)
    with pytest.raises(QuotaExceeded) as err:
        admit(home, alpha, {"CPU": 1.5}, WorkloadKind.OTHER)
    assert err.value.in_use == 3.0
    # the error crosses process boundaries intact
    import pickle

    again = pickle.loads(pickle.dumps(err.value))
    assert (again.tenant, again.in_use) == ("alpha", 3.0)


def test_budgets_config_validation():
    with pytest.raises(ValueError, match="soft_usd"):
        BudgetsConfig.model_validate({"tenants": {"a": {"budget": {"soft_usd": 5, "hard_usd": 1}}}})
    with pytest.raises(ValueError):
        BudgetsConfig.model_validate({"tenants": {"idle": {}}})  # reserved name
    assert period_start("month", 1_700_000_000) == 1698796800.0  # 2023-11-01 UTC
    assert period_start("week", 1_700_000_000) == 1699833600.0  # Monday 2023-11-13


def test_cost_rows_and_kpis():
    records = [
        rec("alpha", 1000.0, ws=0.0, job_id="j1", workload="train", used_s=500.0),
        rec("alpha", 1000.0, ws=10.0, job_id="j2", workload="train", used_s=700.0),
        rec("beta", 2000.0, ws=0.0, job_id="s1", workload="serve", deployment="app/d"),
        rec("idle", 4000.0, ws=0.0),
    ]
    rows = cost_rows(records, BOOK, by="tenant")
    assert [r["tenant"] for r in rows] == ["idle", "alpha", "beta"]
    by = {r["tenant"]: r for r in rows}
    assert by["alpha"]["cost_usd"] == pytest.approx(2.0) and by["idle"]["share"] == pytest.approx(0.5)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert len(cost_rows(records, BOOK, by="job")) == 4
    assert {r["day"] for r in cost_rows(records, BOOK, by="day")} == {"1970-01-01"}
    with pytest.raises(ValueError, match="--by"):
        cost_rows(records, BOOK, by="color")
    k = {r["tenant"]: r for r in kpis(
        records, BOOK,
        serve_usage=[{"tenant": "beta", "requests": 4000, "tokens": 2_000_000}],
        events=[{"tenant": "alpha", "kind": "checkpoint_validated", "count": 1},
                {"tenant": "alpha", "kind": "run_failed", "count": 1}],
    )}
    assert k["alpha"]["cost_per_job_usd"] == pytest.approx(1.0)
    assert k["alpha"]["cost_per_validated_checkpoint_usd"] == pytest.approx(2.0)  # the failed run counts
    assert k["alpha"]["utilisation"] == pytest.approx(0.6)
    assert k["beta"]["cost_per_1k_requests_usd"] == pytest.approx(0.5)
    assert k["beta"]["cost_per_1m_tokens_usd"] == pytest.approx(1.0)
    assert k["beta"]["utilisation"] is None  # not measured: shown as unknown, not 0
    assert k["idle"]["idle_cost_usd"] == pytest.approx(4.0)


def test_parse_since():
    assert parse_since("2h", now=10000.0) == 2800.0
    assert parse_since("1700000000", now=0) == 1700000000.0
    assert parse_since("2023-11-14", now=0) == 1699920000.0
    assert parse_since(None, now=0) is None
    with pytest.raises(ConfigError, match="--since"):
        parse_since("yesterday-ish", now=0)
