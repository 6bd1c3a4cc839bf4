"""Per-pool quotas and the pool label of the exported metrics: config, admission, live holdings by pool, CLI."""

import pickle
import time

import pytest

from aifactory.cost.admission import admit
from aifactory.cost.attribution import Holding
from aifactory.cost.budgets import BudgetsConfig, load_budgets, save_budgets
from aifactory.cost.collector import CollectorConfig, CollectorCore
from aifactory.cost.exporter import CostMetrics
from aifactory.cost.ledger import Ledger
from aifactory.cost.records import UsageRecord
from aifactory.exceptions import MeterUnavailable, QuotaExceeded
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef, WorkloadKind

ALPHA = TenantRef(tenant="alpha")
H200 = ("gpu", "H200", "gpu-h200", "")
L4 = ("gpu", "L4", "inference-l4", "")


@pytest.fixture
def home(tmp_path):
    return FactoryHome.from_env(tmp_path / "home").ensure()


def _quota(home, quota):
    save_budgets(home, BudgetsConfig.model_validate({"tenants": {"alpha": {"quota": quota}}}))


def test_pool_quota_config_keeps_old_configs_and_names_bad_pools():
    old = BudgetsConfig.model_validate({"tenants": {"a": {"quota": {"cpu": 4, "gpu": 1}}}})
    assert old.tenants["a"].quota.pools == {}
    new = BudgetsConfig.model_validate({"tenants": {"a": {"quota": {"gpu": 8, "pools": {"gpu-h200": {"gpu": 2}}}}}})
    assert new.tenants["a"].quota.pools["gpu-h200"].gpu == 2
    with pytest.raises(ValueError, match="'bad pool!' is not a pool name"):
        BudgetsConfig.model_validate({"tenants": {"a": {"quota": {"pools": {"bad pool!": {"gpu": 1}}}}}})
    with pytest.raises(ValueError, match="memory"):  # a pool quota has cpu and gpu only
        BudgetsConfig.model_validate({"tenants": {"a": {"quota": {"pools": {"p": {"memory": 1}}}}}})


def test_admission_refuses_over_a_pool_quota_naming_tenant_pool_resource(home):
    _quota(home, {"gpu": 8, "pools": {"gpu-h200": {"gpu": 2}}})
    # live holdings: 1 GPU in gpu-h200 and 3 in inference-l4 (4 across pools)
    Ledger.of(home).set_live("c1", {("alpha", "gpu"): 4.0},
                             by_pool={("alpha", "gpu", "gpu-h200"): 1.0, ("alpha", "gpu", "inference-l4"): 3.0})
    admit(home, ALPHA, {"GPU": 1}, WorkloadKind.TRAIN, pool="gpu-h200")
    with pytest.raises(QuotaExceeded) as err:
        admit(home, ALPHA, {"GPU": 2}, WorkloadKind.TRAIN, pool="gpu-h200")
    e = err.value
    assert (e.tenant, e.pool, e.resource, e.requested, e.limit, e.in_use) == ("alpha", "gpu-h200", "GPU", 2.0, 2.0, 1.0)
    assert "QuotaExceeded(tenant='alpha', pool='gpu-h200', resource='GPU', requested=2, held=1, limit=2)" in str(e)
    again = pickle.loads(pickle.dumps(e))  # crosses process boundaries with its pool
    assert (again.pool, again.in_use) == ("gpu-h200", 1.0)
    # another pool is bound by the all-pools quota only: 4 held + 4 = 8 fits, + 5 does not
    admit(home, ALPHA, {"GPU": 4}, WorkloadKind.TRAIN, pool="inference-l4")
    with pytest.raises(QuotaExceeded) as err:
        admit(home, ALPHA, {"GPU": 5}, WorkloadKind.TRAIN, pool="inference-l4")
    assert err.value.pool is None and err.value.limit == 8.0
    # work that names no pool may land in gpu-h200, so it must fit there too
    admit(home, ALPHA, {"GPU": 1, "CPU": 64}, WorkloadKind.TRAIN)
    with pytest.raises(QuotaExceeded, match="pool='gpu-h200'"):
        admit(home, ALPHA, {"GPU": 2}, WorkloadKind.TRAIN)
    # other tenants and CPU requests are not touched by alpha's GPU pool quota
    admit(home, TenantRef(tenant="beta"), {"GPU": 50}, WorkloadKind.TRAIN, pool="gpu-h200")


def test_pool_quota_without_fresh_collector_fails_closed(home):
    _quota(home, {"pools": {"gpu-h200": {"gpu": 1, "cpu": 4}}})
    with pytest.raises(MeterUnavailable):  # within the limit, but the holdings are unknown
        admit(home, ALPHA, {"GPU": 1, "CPU": 4}, WorkloadKind.SERVE, pool="gpu-h200")
    with pytest.raises(QuotaExceeded) as err:  # over the limit by itself
        admit(home, ALPHA, {"CPU": 4.5}, WorkloadKind.SERVE, pool="gpu-h200")
    assert (err.value.resource, err.value.pool, err.value.in_use) == ("CPU", "gpu-h200", 0.0)


def test_collector_publishes_live_holdings_by_pool(home):
    core = CollectorCore(CollectorConfig(ledger_path=str(home.ledger_path), cluster_id="c1"))
    core.tracker.open = {
        "pg:1": Holding("pg:1", "alpha", {H200: 2.0, ("cpu", "cpu", "gpu-h200", ""): 8.0}, start=0.0),
        "actor:2": Holding("actor:2", "alpha", {L4: 1.0, ("cpu", "cpu"): 1.0}, start=0.0),
        # a Serve replica shared 3:1 by alpha and beta
        "actor:3": Holding("actor:3", "unattributed", {H200: 1.0}, start=0.0, deployment="app/d",
                           shares={"alpha/p": 3.0, "beta/p": 1.0}),
    }
    core._publish_live()
    ledger = core.ledger
    assert ledger.live("alpha", max_age_s=60) == pytest.approx({"gpu": 3.75, "cpu": 9.0})
    assert ledger.live("alpha", max_age_s=60, pool="gpu-h200") == pytest.approx({"gpu": 2.75, "cpu": 8.0})
    assert ledger.live("alpha", max_age_s=60, pool="inference-l4") == {"gpu": 1.0}
    assert ledger.live("alpha", max_age_s=60, pool="default") == {"cpu": 1.0}
    assert ledger.live("beta", max_age_s=60, pool="gpu-h200") == pytest.approx({"gpu": 0.25})
    # the collector's status says GPU use is unknown on a machine without NVML
    assert core.status()["gpu"].startswith("unknown")


def test_exported_cost_and_resource_seconds_carry_the_pool(home):
    ws = time.time() - 120
    Ledger.of(home).append([
        UsageRecord(window_start=ws, window_end=ws + 60, tenant="alpha", resource="cpu", sku="cpu",
                    pool="data-cpu", quantity_s=60.0),
        UsageRecord(window_start=ws, window_end=ws + 60, tenant="alpha", resource="cpu", sku="cpu",
                    quantity_s=30.0),
        UsageRecord(window_start=ws, window_end=ws + 60, tenant="alpha", resource="gpu", sku="H200",
                    pool="gpu-h200", quantity_s=60.0, used_s=45.0, gpu_memory_gib_s=600.0, energy_j=21000.0),
        UsageRecord(window_start=ws, window_end=ws + 60, tenant="beta", resource="gpu", sku="H200",
                    pool="gpu-h200", quantity_s=60.0),  # NVML unknown: no used-GPU series
    ])
    families = {f.name: f for f in CostMetrics(home.ledger_path, home_root=home.root)._families()}
    for name in ("aifactory_cost_usd", "aifactory_resource_seconds"):
        by_pool = {s.labels["pool"]: s.value for s in families[name].samples if s.labels["tenant"] == "alpha"}
        assert set(by_pool) == {"data-cpu", "default", "gpu-h200"}, name
    seconds = {(s.labels["pool"], s.labels["resource"], s.labels["tenant"]): s.value
               for s in families["aifactory_resource_seconds"].samples}
    assert seconds == {("data-cpu", "cpu", "alpha"): 60.0, ("default", "cpu", "alpha"): 30.0,
                       ("gpu-h200", "gpu", "alpha"): 60.0, ("gpu-h200", "gpu", "beta"): 60.0}
    # GPU use measured by NVML, by tenant and pool; the GPU's used seconds are not CPU-seconds
    gpu = [(s.labels["tenant"], s.labels["pool"], s.value) for s in families["aifactory_used_gpu_seconds"].samples]
    assert gpu == [("alpha", "gpu-h200", 45.0)]
    assert [s.value for s in families["aifactory_gpu_energy_joules"].samples] == [21000.0]
    assert [s.value for s in families["aifactory_used_cpu_seconds"].samples] == []


def test_cli_set_quota_per_pool_keeps_the_other_limits(home, monkeypatch, capsys):
    from aifactory.cli.main import main

    monkeypatch.setenv("AIFACTORY_HOME", str(home.root))
    assert main(["costs", "set-quota", "alpha", "--cpu", "16", "--gpu", "8"]) == 0
    assert main(["costs", "set-quota", "alpha", "--gpu", "2", "--pool", "gpu-h200"]) == 0
    assert main(["costs", "set-quota", "alpha", "--cpu", "4", "--pool", "data-cpu"]) == 0
    q = load_budgets(home).tenants["alpha"].quota
    assert (q.cpu, q.gpu) == (16.0, 8.0)
    assert {p: v.model_dump(exclude_none=True) for p, v in q.pools.items()} == {
        "gpu-h200": {"gpu": 2.0}, "data-cpu": {"cpu": 4.0}}
    assert main(["costs", "set-quota", "alpha", "--cpu", "12"]) == 0  # all-pools limits change, pools stay
    q = load_budgets(home).tenants["alpha"].quota
    assert (q.cpu, q.gpu, sorted(q.pools)) == (12.0, None, ["data-cpu", "gpu-h200"])
    capsys.readouterr()
    assert main(["costs", "set-quota", "alpha", "--gpu", "1", "--pool", "no pool"]) != 0
    assert "not a pool name" in capsys.readouterr().err
    assert main(["costs", "set-quota", "alpha", "--gpu", "-1", "--pool", "gpu-h200"]) != 0
    assert "gpu" in capsys.readouterr().err
    # a refused edit leaves the file as it was
    assert load_budgets(home).tenants["alpha"].quota.pools["gpu-h200"].gpu == 2.0
