"""Node pools in cost accounting, without a cluster: spot and per-pool rates in the price book, pricing by
pool, attribution per pool with the capacity invariant, the ledger's pool column (and an older ledger)."""

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from aifactory.cost.attribution import CapacityPoint, Holding, Tracker, attribute, resource_key
from aifactory.cost.kpis import cost_rows
from aifactory.cost.ledger import Ledger
from aifactory.cost.pricebook import DEFAULT_PATH, load_price_book, parse_price_book
from aifactory.cost.pricing import price, price_many
from aifactory.cost.records import POOL_LABEL, PRICING_CLASS_LABEL, UsageRecord
from aifactory.cost.sampler import node_pools, resource_keys
from aifactory.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[2]

BOOK = {
    "version": "p1",
    "rates": [
        {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 0.10, "reserved_usd_per_hour": 0.06,
         "spot_usd_per_hour": 0.03},
        {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.01},
        {"resource": "gpu", "sku": "H100", "on_demand_usd_per_hour": 4.0, "reserved_usd_per_hour": 2.5,
         "spot_usd_per_hour": 1.5},
    ],
    "pools": {
        "train-spot": {"pricing_class": "spot"},
        "train-reserved": {"pricing_class": "reserved"},
        "data": {"rates": [{"resource": "cpu", "sku": "cpu", "usd_per_hour": 0.08},
                           {"resource": "cpu", "sku": "cpu", "region": "eu", "usd_per_hour": 0.09}]},
        "serve": {"pricing_class": "reserved", "rates": [{"resource": "gpu", "sku": "H100", "usd_per_hour": 3.0}]},
    },
}


def rec(**kw):
    base = dict(window_start=0.0, window_end=60.0, tenant="a", resource="cpu", sku="cpu", quantity_s=3600.0)
    base.update(kw)
    return UsageRecord(**base)


def test_spot_rate_and_spot_without_rate_costs_on_demand():
    book = parse_price_book(BOOK)
    assert price(rec(pricing_class="spot"), book).usd == pytest.approx(0.03)
    assert price(rec(resource="gpu", sku="H100", pricing_class="spot"), book).usd == pytest.approx(1.5)
    # memory has no spot rate: on-demand, never zero
    assert price(rec(resource="memory", sku="gib", pricing_class="spot"), book).usd == pytest.approx(0.01)


def test_pool_pricing_class_explicit_rates_and_fallbacks():
    book = parse_price_book(BOOK)
    # The pool's class wins over the record's (the node label's).
    assert price(rec(pool="train-spot", pricing_class="on-demand"), book).usd == pytest.approx(0.03)
    assert price(rec(pool="train-reserved", resource="gpu", sku="H100"), book).usd == pytest.approx(2.5)
    # The pool's own rate wins over the book's, whatever the class; region-specific first, then '*'.
    assert price(rec(pool="data", pricing_class="reserved"), book).usd == pytest.approx(0.08)
    assert price(rec(pool="data", region="eu"), book).usd == pytest.approx(0.09)
    # A pool with a class and one own rate: own rate for that SKU, its class for the others.
    assert price(rec(pool="serve", resource="gpu", sku="h100"), book).usd == pytest.approx(3.0)
    assert price(rec(pool="serve"), book).usd == pytest.approx(0.06)
    # A pool the book does not list (and the default pool) is priced at the record's class, as before pools.
    assert price(rec(pool="elsewhere", pricing_class="spot"), book).usd == pytest.approx(0.03)
    assert price(rec(pricing_class="reserved"), book).usd == pytest.approx(0.06)
    assert price(rec(pool="data"), book).usd_per_hour == pytest.approx(0.08)


def test_pool_validation_names_the_field():
    def problems(pools):
        with pytest.raises(ConfigError) as err:
            parse_price_book({**BOOK, "pools": pools})
        return str(err.value)

    assert "pools.empty: " in problems({"empty": {}}) and "pricing_class and/or rates" in problems({"empty": {}})
    assert "pools.p.pricing_class" in problems({"p": {"pricing_class": "preemptible"}})
    assert "pools.p.rates.0.usd_per_hour" in problems({"p": {"rates": [{"resource": "cpu", "sku": "cpu",
                                                                         "usd_per_hour": -1}]}})
    assert "pools.p.rates.0.on_demand_usd_per_hour" in problems(
        {"p": {"rates": [{"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 1}]}})  # unknown field
    dup = {"resource": "gpu", "sku": "H100", "usd_per_hour": 1}
    assert "rates.1: duplicate rate" in problems({"p": {"rates": [dup, {**dup, "sku": "h100"}]}})
    assert "pools.-bad-: a pool name is a label value" in problems({"-bad-": {"pricing_class": "spot"}})
    bad_spot = {**BOOK, "rates": [{**BOOK["rates"][0], "spot_usd_per_hour": -0.1}, BOOK["rates"][1]]}
    with pytest.raises(ConfigError, match=r"rates\.0\.spot_usd_per_hour"):
        parse_price_book(bad_spot)


def _cluster_pools() -> dict[str, str]:
    """pool -> pricing class, from every group / node type in cluster/ (KubeRay and the launcher)."""
    pools = {}
    for path in sorted((REPO / "cluster").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec") or {}
            groups = [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]
            groups += list((doc.get("available_node_types") or {}).values())
            for g in groups:
                labels = g.get("labels") or {}
                if POOL_LABEL in labels:
                    pools[labels[POOL_LABEL]] = labels[PRICING_CLASS_LABEL]
    return pools


def test_default_book_prices_every_pool_of_cluster_at_its_class():
    book = load_price_book(DEFAULT_PATH)
    pools = _cluster_pools()
    assert {"head", "train-gpu-reserved", "train-gpu-spot", "inference-gpu", "inference-asic", "data-cpu"} <= set(pools)
    for pool, cls in pools.items():
        assert pool in book.pools, f"price book lacks pool {pool}"
        assert book.pools[pool].pricing_class.value == cls, pool
    h100 = dict(resource="gpu", sku="H100", quantity_s=3600.0)
    spot, reserved = (price(rec(pool=p, **h100), book).usd for p in ("train-gpu-spot", "train-gpu-reserved"))
    assert spot < reserved < price(rec(**h100), book).usd  # spot < reserved < on-demand
    assert price(rec(pool="data-cpu"), book).usd < price(rec(), book).usd
    assert price(rec(pool="inference-asic", resource="asic", sku="aws-neuron-core"), book).usd > 0


def test_attribution_per_pool_keeps_the_invariant_and_prices_each_pool():
    spot_cpu, spot_gpu = resource_key("cpu", "cpu", "train-spot", "spot"), resource_key("gpu", "H100", "train-spot", "spot")
    data_cpu = resource_key("cpu", "cpu", "data", "")
    plain_cpu = ("cpu", "cpu")
    assert resource_key("cpu", "cpu") == plain_cpu  # unlabelled nodes: keys as before pools
    cap = [CapacityPoint(0.0, {spot_cpu: 8.0, spot_gpu: 2.0, data_cpu: 4.0, plain_cpu: 2.0}),
           CapacityPoint(30.0, {data_cpu: 4.0, plain_cpu: 2.0})]  # the spot node is gone at t=30
    hs = [
        # A placement group with bundles on two pools.
        Holding("pg:1", "alpha", {spot_cpu: 4.0, spot_gpu: 2.0, data_cpu: 1.0}, start=0.0, job_id="j1"),
        Holding("task:2", "beta", {data_cpu: 2.0}, start=10.0, end=50.0, job_id="j2"),
        Holding("actor:3", "unattributed", {plain_cpu: 1.0}, start=0.0),
    ]
    recs = attribute(hs, cap, 0.0, 60.0, pricing_class="reserved")
    by = {}
    for r in recs:
        by[(r.pool, r.tenant, r.resource.value)] = by.get((r.pool, r.tenant, r.resource.value), 0.0) + r.quantity_s
    assert by[("train-spot", "alpha", "gpu")] == pytest.approx(60.0)  # 2 GPUs until the node left at 30 s
    assert by[("train-spot", "idle", "cpu")] == pytest.approx(4 * 30.0)
    assert by[("data", "alpha", "cpu")] == pytest.approx(60.0)
    assert by[("data", "beta", "cpu")] == pytest.approx(80.0)
    assert by[("data", "idle", "cpu")] == pytest.approx(4 * 60 - 140.0)
    assert by[("default", "unattributed", "cpu")] == pytest.approx(60.0)
    # Invariant per pool: tenants + unattributed + idle = capacity x time.
    for pool, resource, capacity_s in (("train-spot", "cpu", 8 * 30), ("train-spot", "gpu", 2 * 30),
                                       ("data", "cpu", 4 * 60), ("default", "cpu", 2 * 60)):
        got = sum(r.quantity_s for r in recs if r.pool == pool and r.resource.value == resource)
        assert got == pytest.approx(capacity_s, rel=0.005), (pool, resource)
    classes = {r.pool: r.pricing_class.value for r in recs}
    assert classes == {"train-spot": "spot", "data": "reserved", "default": "reserved"}  # '' -> the collector's
    assert len({r.key for r in recs}) == len(recs)  # one holder on two pools: distinct keys
    # Priced per pool, and the money adds up to capacity x time x each pool's rate.
    book = parse_price_book(BOOK)
    expected = (8 * 30 * 0.03 + 2 * 30 * 1.5) / 3600 + 4 * 60 * 0.08 / 3600 + 2 * 60 * 0.06 / 3600
    assert price_many(recs, book) == pytest.approx(expected, rel=0.005)
    rows = {(r["pool"], r["tenant"]): r for r in cost_rows(recs, book, by="pool")}
    assert rows[("data", "beta")]["cost_usd"] == pytest.approx(80.0 * 0.08 / 3600, abs=1e-6)
    assert rows[("train-spot", "alpha")]["gpu_s"] == pytest.approx(60.0)


def test_pool_keys_survive_tracker_state_and_read_older_state():
    k = resource_key("gpu", "L4", "inference-gpu", "on-demand")
    t = Tracker()
    t.observe(10.0, [Holding("actor:x", "alpha", {k: 1.0, ("cpu", "cpu"): 2.0})])
    back = Tracker.from_json(t.to_json())
    assert back.open["actor:x"].resources == {k: 1.0, ("cpu", "cpu"): 2.0}
    old = {"open": [{"holder": "actor:y", "tenant": "b", "start": 1.0, "end": None, "project": "default",
                     "workload": "other", "job_id": "", "deployment": "", "resources": [["cpu", "cpu", 1.0]],
                     "shares": None}]}
    assert Tracker.from_json(old).open["actor:y"].resources == {("cpu", "cpu"): 1.0}


def test_record_keys_unchanged_for_unlabelled_nodes():
    assert rec().key == rec(pool="default").key
    assert rec(pool="data").key != rec().key
    assert rec(pool="data").key != rec(pool="serve").key


def test_sampler_keys_by_node_pool_from_labels():
    nodes = [
        SimpleNamespace(node_id="n1", labels={POOL_LABEL: "train-gpu-spot", PRICING_CLASS_LABEL: "Spot"}),
        SimpleNamespace(node_id="n2", labels={POOL_LABEL: "data-cpu"}),
        SimpleNamespace(node_id="n3", labels={PRICING_CLASS_LABEL: "cheap"}),  # not a class: ignored
        SimpleNamespace(node_id="n4", labels={}),
    ]
    assert node_pools(nodes) == {"n1": ("train-gpu-spot", "spot"), "n2": ("data-cpu", ""),
                                 "n3": ("default", ""), "n4": ("default", "")}
    res = {"CPU": 2, "GPU": 1, "memory": 2 * 2**30, "CPU_group_abc": 2}
    assert resource_keys(res, accelerator="H100", asic_sku="x", pool="train-gpu-spot", pricing_class="spot") == {
        ("cpu", "cpu", "train-gpu-spot", "spot"): 2.0, ("gpu", "H100", "train-gpu-spot", "spot"): 1.0,
        ("memory", "gib", "train-gpu-spot", "spot"): 2.0}
    assert resource_keys({"CPU": 1}, accelerator="H100", asic_sku="x") == {("cpu", "cpu"): 1.0}


_OLD_USAGE = """CREATE TABLE usage (
    key TEXT PRIMARY KEY, window_start REAL NOT NULL, window_end REAL NOT NULL,
    tenant TEXT NOT NULL, project TEXT NOT NULL, workload TEXT NOT NULL,
    job_id TEXT NOT NULL, deployment TEXT NOT NULL, holder TEXT NOT NULL,
    resource TEXT NOT NULL, sku TEXT NOT NULL, region TEXT NOT NULL, pricing_class TEXT NOT NULL,
    quantity_s REAL NOT NULL, used_s REAL, written_at REAL NOT NULL)"""


def test_older_ledger_gains_the_pool_column(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.execute(_OLD_USAGE)
    old = rec(tenant="old")
    db.execute("INSERT INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (old.key, 0.0, 60.0, "old", "default", "other", "", "", "", "cpu", "cpu", "local", "on-demand",
                3600.0, None, 1.0))
    db.commit()
    db.close()
    ledger = Ledger(path)
    assert [(r.tenant, r.pool) for r in ledger.usage()] == [("old", "default")]
    assert ledger.append([old]) == 0  # same key as before pools: not counted twice
    assert ledger.append([rec(tenant="new", pool="train-gpu-spot", pricing_class="spot")]) == 1
    assert {(r.tenant, r.pool, r.pricing_class.value) for r in Ledger(path).usage()} == {
        ("old", "default", "on-demand"), ("new", "train-gpu-spot", "spot")}
