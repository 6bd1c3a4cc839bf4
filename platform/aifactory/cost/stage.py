"""The cost stages of ``factory run``: "metering" first (starts the collector), "costs" last (the table)."""

from __future__ import annotations

import time

from aifactory.pipeline.runner import RunContext, StageResult

# Fine-grained for a short run: the costs stage waits for the last window to close.
RUN_SAMPLE_INTERVAL_S = 5.0
RUN_WINDOW_S = 5.0


def cluster_id() -> str:
    """This Ray cluster's identity in the ledger: its head node id (new for every cluster start)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("Resources", {}).get("node:__internal_head__"):
            return "ray-" + node["NodeID"][:16]
    return "ray-" + ray.get_runtime_context().get_node_id()[:16]


def metering_stage(ctx: RunContext) -> StageResult:
    import ray

    from aifactory.cost.collector import CollectorConfig, start_collector

    config = CollectorConfig(ledger_path=str(ctx.home.ledger_path), cluster_id=cluster_id(),
                             dashboard_url=ctx.address.dashboard_url, sample_interval_s=RUN_SAMPLE_INTERVAL_S,
                             window_s=RUN_WINDOW_S)
    handle = start_collector(config)
    status = ray.get(handle.status.remote(), timeout=120)
    ctx.artifacts["metering_since"] = time.time()
    ctx.artifacts["cost_cluster_id"] = config.cluster_id
    return StageResult(summary={"collector": status["cluster_id"], "ledger": status["ledger"],
                                "gpu": status["gpu"]})


def costs_stage(ctx: RunContext) -> StageResult:
    """Close the last window, stop the collector and print the per-tenant table (idle included)."""
    import ray

    from aifactory.cost.collector import get_collector, stop_collector
    from aifactory.cost.kpis import cost_rows
    from aifactory.cost.ledger import Ledger
    from aifactory.cost.pricebook import load_price_book

    since = ctx.artifacts.get("metering_since")
    handle = get_collector()
    if handle is None or since is None:
        return StageResult(ok=False, note="(no collector: run the metering stage first)")
    until = time.time()
    deadline = time.monotonic() + 60
    status = ray.get(handle.flush.remote(), timeout=120)
    while status["cursor"] < until and time.monotonic() < deadline:
        time.sleep(1.0)
        status = ray.get(handle.flush.remote(), timeout=120)
    stop_collector()
    book = load_price_book(home=ctx.home)
    records = [r for r in Ledger.of(ctx.home).usage(since=since) if r.window_start < status["cursor"]]
    rows = cost_rows(records, book, by="tenant")
    table = [{"tenant": r["tenant"], "cpu_s": r["cpu_s"], "memory_gib_s": r["memory_gib_s"], "gpu_s": r["gpu_s"],
              "cost_usd": r["cost_usd"], "share": r["share"]} for r in rows]
    total = sum(r["cost_usd"] for r in rows)
    return StageResult(ok=status["cursor"] >= until,
                       summary={"total_usd": round(total, 6), "tenants": len(rows), "windows": status["windows"],
                                "price_book": book.version, "_table": table},
                       note="" if status["cursor"] >= until else "(the last window did not close in time)")
