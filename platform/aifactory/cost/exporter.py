"""Prometheus endpoint of the factory's cost metrics, beside Ray's own metrics export port.

Metrics are computed from the ledger on each scrape (cached for ``cache_s``), so the exporter holds no
state of its own and may run anywhere that sees the ledger file: in the collector actor
(``CollectorConfig.exporter_port``), or standalone with ``factory costs export --port P``.
"""

from __future__ import annotations

import time
from pathlib import Path

from aifactory.cost.kpis import kpis
from aifactory.cost.ledger import Ledger
from aifactory.cost.pricing import price
from aifactory.cost.records import Resource

UNIT_KPIS = {
    "per_job": "cost_per_job_usd",
    "per_validated_checkpoint": "cost_per_validated_checkpoint_usd",
    "per_1k_requests": "cost_per_1k_requests_usd",
    "per_1m_tokens": "cost_per_1m_tokens_usd",
}


class CostMetrics:
    """A prometheus_client custom collector reading the ledger."""

    def __init__(self, ledger_path: str | Path, *, home_root: str | Path | None = None,
                 lookback_s: float = 35 * 86400, cache_s: float = 5.0):
        self.ledger = Ledger(ledger_path)
        self.home_root = Path(home_root) if home_root else Path(ledger_path).parent
        self.lookback_s = lookback_s
        self.cache_s = cache_s
        self._cache: tuple[float, list] | None = None

    def _families(self) -> list:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from aifactory.cost.budgets import budget_status
        from aifactory.cost.schedule import load_prices
        from aifactory.home import FactoryHome

        home = FactoryHome.from_env(self.home_root)
        book = load_prices(home=home)
        since = time.time() - self.lookback_s
        records = self.ledger.usage(since=since)
        # pool: the node pool the resource was held in (its own price); "default" for unlabelled nodes.
        labels = ["tenant", "project", "workload", "resource", "sku", "pool"]
        cost = GaugeMetricFamily("aifactory_cost_usd", "Cost in USD by tenant, project, workload, resource and "
                                 "node pool (ledger windows in the lookback)", labels=labels)
        secs = GaugeMetricFamily("aifactory_resource_seconds", "Allocated resource-seconds (CPU-s, GPU-s, GiB-s)",
                                 labels=labels)
        used = GaugeMetricFamily("aifactory_used_cpu_seconds", "Measured CPU-seconds used",
                                 labels=["tenant", "project", "workload"])
        gpu_used = GaugeMetricFamily("aifactory_used_gpu_seconds", "GPU-seconds used (NVML utilisation x time) on "
                                     "allocated GPUs, where measured", labels=["tenant", "project", "workload", "pool"])
        gpu_energy = GaugeMetricFamily("aifactory_gpu_energy_joules", "GPU energy (NVML) of allocated GPUs, where "
                                       "measured", labels=["tenant", "project", "workload", "pool"])
        acc: dict[tuple, list[float]] = {}
        used_acc: dict[tuple, float] = {}
        gpu_acc: dict[tuple, list[float]] = {}
        for r in records:
            key = (r.tenant, r.project, r.workload, r.resource.value, r.sku, r.pool)
            a = acc.setdefault(key, [0.0, 0.0])
            a[0] += price(r, book).usd
            a[1] += r.quantity_s
            if r.resource == Resource.CPU and r.used_s is not None:
                k2 = (r.tenant, r.project, r.workload)
                used_acc[k2] = used_acc.get(k2, 0.0) + r.used_s
            elif r.resource == Resource.GPU and (r.used_s is not None or r.energy_j is not None):
                g = gpu_acc.setdefault((r.tenant, r.project, r.workload, r.pool), [0.0, 0.0])
                g[0] += r.used_s or 0.0
                g[1] += r.energy_j or 0.0
        for key, (usd, s) in sorted(acc.items()):
            cost.add_metric(list(key), usd)
            secs.add_metric(list(key), s)
        for key, s in sorted(used_acc.items()):
            used.add_metric(list(key), s)
        for key, (s, joules) in sorted(gpu_acc.items()):
            gpu_used.add_metric(list(key), s)
            gpu_energy.add_metric(list(key), joules)
        unit = GaugeMetricFamily("aifactory_unit_cost_usd", "Unit costs in USD", labels=["tenant", "project", "unit"])
        util = GaugeMetricFamily("aifactory_utilisation_ratio", "Used / allocated CPU-seconds",
                                 labels=["tenant", "project"])
        idle = GaugeMetricFamily("aifactory_idle_cost_usd", "Cost of capacity that nothing held")
        idle_total = 0.0
        for row in kpis(records, book, serve_usage=self.ledger.serve_usage(since=since),
                        events=self.ledger.events(since=since)):
            for name, col in UNIT_KPIS.items():
                if row[col] is not None:
                    unit.add_metric([row["tenant"], row["project"], name], row[col])
            if row["utilisation"] is not None:
                util.add_metric([row["tenant"], row["project"]], row["utilisation"])
            idle_total += row["idle_cost_usd"]
        idle.add_metric([], idle_total)
        remaining = GaugeMetricFamily("aifactory_budget_remaining_usd", "Budget left in the current period",
                                      labels=["tenant", "period"])
        spent = GaugeMetricFamily("aifactory_budget_spent_usd", "Spend in the current budget period",
                                  labels=["tenant", "period"])
        for row in budget_status(home, ledger=self.ledger, book=book):
            spent.add_metric([row["tenant"], row["period"]], row["spent_usd"])
            if row["remaining_usd"] is not None:
                remaining.add_metric([row["tenant"], row["period"]], row["remaining_usd"])
        alerts = CounterMetricFamily("aifactory_budget_alerts", "Soft-limit budget alerts raised",
                                     labels=["tenant", "kind"])
        counts: dict[tuple[str, str], int] = {}
        for a in self.ledger.alerts():
            counts[(a["tenant"], a["kind"])] = counts.get((a["tenant"], a["kind"]), 0) + 1
        for key, n in sorted(counts.items()):
            alerts.add_metric(list(key), n)
        info = GaugeMetricFamily("aifactory_price_book_info", "The price book in use", labels=["version"])
        info.add_metric([book.version], 1.0)
        return [cost, secs, used, gpu_used, gpu_energy, unit, util, idle, remaining, spent, alerts, info]

    def collect(self):
        now = time.monotonic()
        if self._cache is None or now - self._cache[0] > self.cache_s:
            self._cache = (now, self._families())
        yield from self._cache[1]


def serve_exporter(ledger_path: str | Path, *, port: int = 0, home_root: str | Path | None = None):
    """Serve the metrics on http://127.0.0.1:port/metrics in a background thread; returns the bound port."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(CostMetrics(ledger_path, home_root=home_root))
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server.server_address[1]
