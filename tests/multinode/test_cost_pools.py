"""The cost collector on a multi-node cluster: usage attributed per node pool, each pool priced at its rate.

A tenant's driver (a separate process whose Ray job carries the tenant's metadata) holds a placement
group with one bundle on a spot training node and one on a data node, and an actor on the data node.
The collector core samples the real state API and node table, and commits windows to a ledger; every
committed window must hold, per pool and resource, tenants + unattributed + idle = capacity x time, the
tenant's holdings must land on the right pools, and pricing must use each pool's rate from the default
price book (spot for train-gpu-spot, the pool's own CPU rate for data-cpu).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict

import pytest

TENANT_DRIVER = """
import sys
import ray
from ray.job_config import JobConfig
from ray.util.placement_group import placement_group
from aifactory.tenancy import TenantRef, WorkloadKind, job_metadata

meta = job_metadata(TenantRef(tenant="alpha", project="pools"), workload=WorkloadKind.TRAIN)
ray.init(address=sys.argv[1], job_config=JobConfig(metadata=meta), logging_level="WARNING", log_to_driver=False)
pg = placement_group([{"CPU": 1, "pool_train": 0.01}, {"CPU": 1, "pool_data": 0.01}], strategy="SPREAD")
ray.get(pg.ready(), timeout=90)

@ray.remote(num_cpus=1, resources={"pool_data": 0.01})
class Holder:
    def node(self):
        return ray.get_runtime_context().get_node_id()

h = Holder.remote()
print("READY", ray.get(h.node.remote(), timeout=90), flush=True)
sys.stdin.read()  # hold everything until the test closes stdin
"""

WINDOW_S, SAMPLE_S = 2.0, 1.0
GIB = float(1 << 30)


def test_collector_attributes_and_prices_per_node_pool(multinode, tmp_path, capsys):
    import ray

    from aifactory.cli.main import main as factory
    from aifactory.cost.collector import CollectorConfig, CollectorCore
    from aifactory.cost.ledger import Ledger
    from aifactory.cost.pricebook import load_price_book
    from aifactory.cost.pricing import price

    pricing = "aifactory.io/pricing-class"
    spot = multinode.add_pool_node("train-gpu-spot", num_cpus=2, labels={pricing: "spot"})
    data = multinode.add_pool_node("data-cpu", num_cpus=2, labels={pricing: "on-demand"})
    address = multinode.cluster.address
    assert multinode.cluster.webui_url, "the session cluster must run a dashboard (the state API)"
    dashboard = f"http://{multinode.cluster.webui_url}"  # never a default port: other clusters share this host
    driver = subprocess.Popen([sys.executable, "-c", TENANT_DRIVER, address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line.startswith("READY"), f"tenant driver failed (rc={driver.poll()}): {line!r}"
        assert line.split()[1] == data.node_id

        ledger_path = tmp_path / "ledger.sqlite"
        core = CollectorCore(CollectorConfig(ledger_path=str(ledger_path), cluster_id="pools",
                                             dashboard_url=dashboard, sample_interval_s=SAMPLE_S, window_s=WINDOW_S))
        core.step()
        t0 = core.tracker.last_t  # holders were first seen here: windows from here on are fully held
        deadline = time.monotonic() + 40
        while core.cursor < t0 + 3 * WINDOW_S and time.monotonic() < deadline:
            time.sleep(SAMPLE_S / 2)
            core.step()
        assert core.last_error is None
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)

    records = [r for r in Ledger(ledger_path).usage() if r.window_start >= t0]
    windows = sorted({r.window_start for r in records})
    assert len(windows) >= 2, f"too few full windows committed: cursor={core.cursor}, t0={t0}"

    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    capacity = defaultdict(float)  # (pool, resource) -> amount
    for n in nodes.values():
        pool = n["Labels"].get("aifactory.io/pool", "default")
        capacity[(pool, "cpu")] += n["Resources"].get("CPU", 0.0)
        capacity[(pool, "memory")] += n["Resources"].get("memory", 0.0) / GIB

    book = load_price_book()
    for w in windows:
        in_w = [r for r in records if r.window_start == w]
        held = defaultdict(float)
        for r in in_w:
            held[(r.pool, r.resource.value)] += r.quantity_s
            held[(r.pool, r.tenant, r.resource.value)] += r.quantity_s
        # The invariant, per pool and resource.
        for (pool, resource), amount in capacity.items():
            assert held[(pool, resource)] == pytest.approx(amount * WINDOW_S, rel=0.005), (w, pool, resource)
        # The tenant's bundles and actor on the pools they were placed on; the rest of the spot node is idle.
        assert held[("train-gpu-spot", "alpha", "cpu")] == pytest.approx(1 * WINDOW_S, rel=0.005)
        assert held[("train-gpu-spot", "idle", "cpu")] == pytest.approx(1 * WINDOW_S, rel=0.005)
        assert held[("data-cpu", "alpha", "cpu")] == pytest.approx(2 * WINDOW_S, rel=0.005)
        assert held[("data-cpu", "idle", "cpu")] == pytest.approx(0.0, abs=0.01)
        assert {r.pricing_class.value for r in in_w if r.pool == "train-gpu-spot"} == {"spot"}
        assert all(r.job_id for r in in_w if r.tenant == "alpha")
        # Each pool at its own rate: the book's spot CPU rate, the data pool's own CPU rate.
        alpha = [r for r in in_w if r.tenant == "alpha" and r.resource.value == "cpu"]
        rates = {r.pool: price(r, book).usd_per_hour for r in alpha}
        assert rates == {"train-gpu-spot": book.rate("cpu", "cpu", "local").spot_usd_per_hour,
                         "data-cpu": book.pools["data-cpu"].rates[0].usd_per_hour}
        assert sum(price(r, book).usd for r in alpha) == pytest.approx(
            (1 * WINDOW_S * rates["train-gpu-spot"] + 2 * WINDOW_S * rates["data-cpu"]) / 3600, rel=0.005)
    assert spot.node_id in nodes

    # factory costs --by pool reads the same ledger after the fact.
    capsys.readouterr()
    assert factory(["costs", "--by", "pool", "--ledger", str(ledger_path), "--format", "json"]) == 0
    rows = {(r["pool"], r["tenant"]) for r in json.loads(capsys.readouterr().out)}
    assert {("train-gpu-spot", "alpha"), ("data-cpu", "alpha"), ("train-gpu-spot", "idle"), ("head", "idle")} <= rows
