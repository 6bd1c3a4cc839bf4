"""Cost tables and KPIs: pure functions of usage records, serving usage, events and a price book.

KPIs per tenant and project: total cost; cost per job; cost per validated checkpoint (all training
cost, failed runs and retries included, over the checkpoints that passed validation); cost per 1k
requests (over answered, 2xx, requests; 429s are counted apart as ``rejected_requests``) and per 1M tokens
served (serving cost over the serving layer's counts); utilisation (used /
allocated CPU-seconds where usage was measured); and the idle cost of the cluster.
"""

from __future__ import annotations

import datetime as _dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from aifactory.cost.pricebook import PriceBook
from aifactory.cost.pricing import price
from aifactory.cost.records import Resource, UsageRecord
from aifactory.tenancy import IDLE

GROUPINGS: dict[str, tuple[str, ...]] = {
    "tenant": ("tenant",),
    "project": ("tenant", "project"),
    "job": ("tenant", "project", "job_id", "workload"),
    "deployment": ("tenant", "deployment"),
    "day": ("day", "tenant"),
    "resource": ("tenant", "resource", "sku"),
    "pool": ("pool", "tenant"),  # node pools (aifactory.io/pool label), each priced at its own rate
}


def _day(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d")


def _value(r: UsageRecord, field: str) -> str:
    if field == "day":
        return _day(r.window_start)
    v = getattr(r, field)
    return v.value if hasattr(v, "value") else v


def cost_rows(records: Iterable[UsageRecord], book: PriceBook, *, by: str = "tenant") -> list[dict]:
    """One row per group: resource-seconds by resource, used CPU-seconds, cost in USD, share of total, and
    ``estimated`` / ``estimated_usd``: whether (and how much of) the row's cost comes from records whose
    edges the meter estimated (:attr:`UsageRecord.estimated`)."""
    if by not in GROUPINGS:
        raise ValueError(f"--by must be one of {sorted(GROUPINGS)}, got {by!r}")
    fields = GROUPINGS[by]
    acc: dict[tuple, dict] = {}
    total = 0.0
    for r in records:
        key = tuple(_value(r, f) for f in fields)
        row = acc.setdefault(key, {**dict(zip(fields, key)), "cpu_s": 0.0, "gpu_s": 0.0, "memory_gib_s": 0.0,
                                   "asic_s": 0.0, "used_cpu_s": 0.0, "cost_usd": 0.0, "estimated": False,
                                   "estimated_usd": 0.0})
        col = {Resource.CPU: "cpu_s", Resource.GPU: "gpu_s", Resource.MEMORY: "memory_gib_s",
               Resource.ASIC: "asic_s"}[r.resource]
        row[col] += r.quantity_s
        if r.resource == Resource.CPU and r.used_s is not None:
            row["used_cpu_s"] += r.used_s
        usd = price(r, book).usd
        row["cost_usd"] += usd
        if r.estimated:
            row["estimated"] = True
            row["estimated_usd"] += usd
        total += usd
    rows = sorted(acc.values(), key=lambda x: (-x["cost_usd"], tuple(str(x[f]) for f in fields)))
    for row in rows:
        row["share"] = row["cost_usd"] / total if total > 0 else 0.0
        for k in ("cpu_s", "gpu_s", "memory_gib_s", "asic_s", "used_cpu_s"):
            row[k] = round(row[k], 3)
        row["cost_usd"] = round(row["cost_usd"], 6)
        row["estimated_usd"] = round(row["estimated_usd"], 6)
        row["share"] = round(row["share"], 4)
    return rows


def reprice_rows(records: Sequence[UsageRecord], book, what_if, *, by: str = "tenant") -> list[dict]:
    """What if: the rows of :func:`cost_rows` under ``book`` (the books in force), each with ``what_if_usd``
    (the same records under ``what_if``) and ``delta_usd``. Pure; writes nothing."""
    fields = GROUPINGS.get(by, ())
    rows = cost_rows(records, book, by=by)
    alt = {tuple(r[f] for f in fields): r["cost_usd"] for r in cost_rows(records, what_if, by=by)}
    for row in rows:
        row["what_if_usd"] = alt[tuple(row[f] for f in fields)]
        row["delta_usd"] = round(row["what_if_usd"] - row["cost_usd"], 6)
    return rows


def kpis(
    records: Sequence[UsageRecord],
    book: PriceBook,
    *,
    serve_usage: Sequence[Mapping] = (),
    events: Sequence[Mapping] = (),
) -> list[dict]:
    """KPIs per (tenant, project); the ``idle`` row carries the cluster's idle cost."""
    cost: dict[tuple[str, str], float] = defaultdict(float)
    cost_by_workload: dict[tuple[str, str, str], float] = defaultdict(float)
    jobs: dict[tuple[str, str], set] = defaultdict(set)
    alloc_cpu: dict[tuple[str, str], float] = defaultdict(float)
    used_cpu: dict[tuple[str, str], float] = defaultdict(float)
    measured: dict[tuple[str, str], bool] = defaultdict(bool)
    for r in records:
        k = (r.tenant, r.project)
        usd = price(r, book).usd
        cost[k] += usd
        cost_by_workload[(r.tenant, r.project, r.workload)] += usd
        if r.job_id:
            jobs[k].add(r.job_id)
        if r.resource == Resource.CPU and r.used_s is not None:
            alloc_cpu[k] += r.quantity_s
            used_cpu[k] += r.used_s
            measured[k] = True
    requests: dict[tuple[str, str], float] = defaultdict(float)
    rejected: dict[tuple[str, str], float] = defaultdict(float)
    tokens: dict[tuple[str, str], float] = defaultdict(float)
    for s in serve_usage:
        k = (s["tenant"], s.get("project", "default"))
        # Answered (2xx) requests only; a row from before the split counts all of its requests.
        answered = s.get("answered")
        requests[k] += float(s.get("requests", 0) if answered is None else answered)
        rejected[k] += float(s.get("rejected") or 0)
        tokens[k] += float(s.get("tokens", 0))
    checkpoints: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e["kind"] == "checkpoint_validated":
            checkpoints[(e["tenant"], e.get("project", "default"))] += float(e.get("count", 1))
    rows = []
    for k in sorted(set(cost) | set(requests) | set(checkpoints)):
        tenant, project = k
        total = cost.get(k, 0.0)
        serve_cost = cost_by_workload.get((tenant, project, "serve"), 0.0)
        train_cost = cost_by_workload.get((tenant, project, "train"), 0.0)
        n_jobs = len(jobs.get(k, ()))
        rows.append({
            "tenant": tenant,
            "project": project,
            "cost_usd": round(total, 6),
            "jobs": n_jobs,
            "cost_per_job_usd": _ratio(total, n_jobs),
            "validated_checkpoints": checkpoints.get(k, 0.0),
            "cost_per_validated_checkpoint_usd": _ratio(train_cost, checkpoints.get(k, 0.0)),
            "requests": requests.get(k, 0.0),
            "rejected_requests": rejected.get(k, 0.0),
            "cost_per_1k_requests_usd": _ratio(serve_cost, requests.get(k, 0.0) / 1000.0),
            "tokens": tokens.get(k, 0.0),
            "cost_per_1m_tokens_usd": _ratio(serve_cost, tokens.get(k, 0.0) / 1e6),
            "utilisation": _ratio(used_cpu.get(k, 0.0), alloc_cpu.get(k, 0.0)) if measured.get(k) else None,
            "idle_cost_usd": round(total, 6) if tenant == IDLE else 0.0,
        })
    return rows


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None (shown as "-") when there is nothing to divide by."""
    return round(num / den, 6) if den > 0 else None


def parse_since(text: str | None, *, now: float) -> float | None:
    """``--since``: ``2h``, ``30m``, ``7d``, ``90s``, an ISO date/time, or Unix seconds."""
    if text is None:
        return None
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1]]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(t)
    except ValueError:
        from aifactory.exceptions import ConfigError

        raise ConfigError("--since", [f"{text!r}: use a duration (90s, 30m, 2h, 7d), an ISO date or Unix seconds"])
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()
