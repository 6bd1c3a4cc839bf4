"""The queue's Prometheus metrics, through ``ray.util.metrics`` so that Ray's metrics export carries them.

Recorded only in a process that is a Ray driver or worker (the dispatcher actor); an inline pass in a plain
CLI process records nothing here (the next actor pass does). Series:

- ``aifactory_queue_depth{tenant, lane}``: entries queued;
- ``aifactory_queue_wait_seconds{tenant, lane}``: a histogram of each dispatched entry's queue wait;
- ``aifactory_queue_admitted_share{tenant, lane}``: the dominant-resource fraction of the cluster held by the
  queue's running entries;
- ``aifactory_queue_preemptions_total{tenant, lane}`` and ``aifactory_queue_plan_ms``.
"""

from __future__ import annotations

from collections import defaultdict

_metrics: dict | None = None
WAIT_BOUNDARIES_S = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


def _get() -> dict | None:
    global _metrics
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not ray.is_initialized():
        return None
    if _metrics is None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = ("tenant", "lane")
        _metrics = {
            "depth": Gauge("aifactory_queue_depth", description="Queue entries waiting, by tenant and lane.",
                           tag_keys=tags),
            "wait": Histogram("aifactory_queue_wait_seconds", description="Seconds each dispatched entry waited.",
                              boundaries=WAIT_BOUNDARIES_S, tag_keys=tags),
            "share": Gauge("aifactory_queue_admitted_share",
                           description="Dominant-resource fraction of the cluster held by running queue entries.",
                           tag_keys=tags),
            "preempt": Counter("aifactory_queue_preemptions_total", description="Entries asked to yield.",
                               tag_keys=tags),
            "plan_ms": Gauge("aifactory_queue_plan_ms", description="Milliseconds the last plan took."),
        }
        _metrics["seen"] = set()
    return _metrics


def record_pass(store, lanes, *, capacity, plan_ms: float | None = None) -> None:
    m = _get()
    if m is None:
        return
    from aifactory.queue.policy import dominant_share

    depth: dict[tuple[str, str], int] = defaultdict(int)
    share: dict[tuple[str, str], float] = defaultdict(float)
    for e in store.list(states=("queued", "dispatching", "running", "preempting")):
        if e.state in ("queued", "dispatching"):
            depth[(e.tenant, e.lane)] += 1
        elif capacity:
            share[(e.tenant, e.lane)] += min(1.0, dominant_share(e.resources, capacity))
    keys = set(depth) | set(share) | m["seen"]
    for tenant, lane in keys:  # a tenant whose queue emptied reads 0, not its last value
        tags = {"tenant": tenant, "lane": lane}
        m["depth"].set(depth.get((tenant, lane), 0), tags=tags)
        m["share"].set(share.get((tenant, lane), 0.0), tags=tags)
    m["seen"] = keys
    if plan_ms is not None:
        m["plan_ms"].set(plan_ms)


def record_start(entry, wait_s: float) -> None:
    m = _get()
    if m is not None:
        m["wait"].observe(wait_s, tags={"tenant": entry.tenant, "lane": entry.lane})


def record_preemption(entry) -> None:
    m = _get()
    if m is not None:
        m["preempt"].inc(tags={"tenant": entry.tenant, "lane": entry.lane})
