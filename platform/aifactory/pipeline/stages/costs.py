"""The cost stages of ``factory run``: "metering" first (starts the collector), "costs" last (the table)."""

from __future__ import annotations

import time

from aifactory.cost.meter import cluster_id
from aifactory.pipeline.runner import RunContext, StageResult

# Fine-grained for a short run: the costs stage waits for the last window to close.
RUN_SAMPLE_INTERVAL_S = 5.0
RUN_WINDOW_S = 5.0


def metering_stage(ctx: RunContext) -> StageResult:
    """Use the cluster's running meter (``factory up`` starts one); on an embedded cluster, start one with
    fine windows for this short run."""
    import ray

    from aifactory.cost.collector import CollectorConfig, get_collector, start_collector

    handle = get_collector()
    started = handle is None
    if started:
        config = CollectorConfig(ledger_path=str(ctx.home.ledger_path), cluster_id=cluster_id(),
                                 dashboard_url=ctx.address.dashboard_url, sample_interval_s=RUN_SAMPLE_INTERVAL_S,
                                 window_s=RUN_WINDOW_S)
        handle = start_collector(config)
    status = ray.get(handle.status.remote(), timeout=120)
    ctx.artifacts["metering_since"] = time.time()
    ctx.artifacts["cost_cluster_id"] = status["cluster_id"]
    ctx.artifacts["meter_started_here"] = started
    return StageResult(summary={"collector": status["cluster_id"], "ledger": status["ledger"],
                                "gpu": status["gpu"], "meter": "started" if started else "running"})


def costs_stage(ctx: RunContext) -> StageResult:
    """Close the last window, stop the collector if this run started it, and print the per-tenant table
    (idle included)."""
    import ray

    from aifactory.cost.collector import get_collector, stop_collector
    from aifactory.cost.kpis import cost_rows
    from aifactory.cost.ledger import Ledger
    from aifactory.cost.schedule import load_prices

    since = ctx.artifacts.get("metering_since")
    handle = get_collector()
    if handle is None or since is None:
        return StageResult(ok=False, note="(no collector: run the metering stage first)")
    until = time.time()
    status = ray.get(handle.flush.remote(), timeout=120)
    # The last window closes one window plus two samples after the run's end.
    cfg = ray.get(handle.get_config.remote(), timeout=60)
    deadline = time.monotonic() + cfg["window_s"] + 3 * cfg["sample_interval_s"] + 15
    while status["cursor"] < until and time.monotonic() < deadline:
        time.sleep(1.0)
        status = ray.get(handle.flush.remote(), timeout=120)
    if ctx.artifacts.get("meter_started_here"):  # a meter of a shared cluster keeps running
        stop_collector()
    book = load_prices(home=ctx.home)
    records = [r for r in Ledger.of(ctx.home).usage(since=since) if r.window_start < status["cursor"]]
    rows = cost_rows(records, book, by="tenant")
    table = [{"tenant": r["tenant"], "cpu_s": r["cpu_s"], "memory_gib_s": r["memory_gib_s"], "gpu_s": r["gpu_s"],
              "cost_usd": r["cost_usd"], "share": r["share"]} for r in rows]
    total = sum(r["cost_usd"] for r in rows)
    return StageResult(ok=status["cursor"] >= until,
                       summary={"total_usd": round(total, 6), "tenants": len(rows), "windows": status["windows"],
                                "price_book": book.version, "_table": table},
                       note="" if status["cursor"] >= until else "(the last window did not close in time)")
