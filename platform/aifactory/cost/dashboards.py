"""The Grafana dashboard of the factory's costs: per-tenant cost, unit costs, utilisation, serving latency.

:func:`dashboard` builds the JSON; :func:`write_provisioning` writes it with a file-provider YAML that
Grafana's provisioning directory takes; :func:`push` uploads it with ``grafana-client`` when a Grafana URL
and token are configured (``AIFACTORY_GRAFANA_URL`` / ``AIFACTORY_GRAFANA_TOKEN``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

UID = "aifactory-costs"

# (title, PromQL, unit, panel type). Every query must return data on a factory cluster with traffic:
# the integration test runs each one against a real Prometheus.
PANELS: list[tuple[str, str, str, str]] = [
    ("Cost by tenant (USD)", "sum by (tenant) (aifactory_cost_usd)", "currencyUSD", "bargauge"),
    ("Cost by tenant and resource (USD)", "sum by (tenant, resource) (aifactory_cost_usd)", "currencyUSD", "table"),
    ("Cost by node pool and resource (USD)", "sum by (pool, resource) (aifactory_cost_usd)", "currencyUSD",
     "table"),
    ("Cost by workload (USD)", "sum by (workload) (aifactory_cost_usd)", "currencyUSD", "piechart"),
    ("Allocated CPU-seconds by tenant", 'sum by (tenant) (aifactory_resource_seconds{resource="cpu"})', "s",
     "timeseries"),
    ("Idle cost (USD)", "aifactory_idle_cost_usd", "currencyUSD", "stat"),
    ("Unit costs (USD)", "aifactory_unit_cost_usd", "currencyUSD", "table"),
    ("Utilisation (used / allocated CPU)", "aifactory_utilisation_ratio", "percentunit", "bargauge"),
    ("Budget remaining (USD)", "aifactory_budget_remaining_usd", "currencyUSD", "bargauge"),
    ("Node CPU utilisation (Ray)", "avg(ray_node_cpu_utilization)", "percent", "timeseries"),
    ("Serving latency p95 (ms)",
     "histogram_quantile(0.95, sum by (le, deployment) (rate(ray_serve_deployment_processing_latency_ms_bucket[1m])))",
     "ms", "timeseries"),
    ("Serving requests/s by deployment",
     "sum by (deployment) (rate(ray_serve_deployment_request_counter_total[1m]))", "reqps", "timeseries"),
]


def dashboard(*, datasource_uid: str = "prometheus") -> dict:
    panels = []
    for i, (title, expr, unit, kind) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "title": title,
            "type": kind,
            "datasource": {"type": "prometheus", "uid": datasource_uid},
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": datasource_uid}}],
        })
    return {
        "uid": UID,
        "title": "aifactory: per-tenant costs",
        "tags": ["aifactory", "cost"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
    }


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def write_provisioning(directory: str | Path, *, datasource_uid: str = "prometheus") -> Path:
    """Write ``aifactory-costs.json`` and a provider ``aifactory.yaml`` for Grafana's provisioning dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{UID}.json"
    path.write_text(json.dumps(dashboard(datasource_uid=datasource_uid), indent=2))
    (directory / "aifactory.yaml").write_text(
        "apiVersion: 1\nproviders:\n  - name: aifactory\n    type: file\n    folder: aifactory\n"
        f"    options:\n      path: {directory}\n"
    )
    return path


def push(url: str | None = None, token: str | None = None, *, datasource_uid: str = "prometheus") -> dict | None:
    """Upload the dashboard through grafana-client; None (nothing done) when no Grafana is configured."""
    url = url or os.environ.get("AIFACTORY_GRAFANA_URL")
    token = token or os.environ.get("AIFACTORY_GRAFANA_TOKEN")
    if not url or not token:
        return None
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token)
    return api.dashboard.update_dashboard({"dashboard": dashboard(datasource_uid=datasource_uid), "overwrite": True})
