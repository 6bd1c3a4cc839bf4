"""The queue's decisions, as a pure function of numbers: what starts now, what is asked to yield, why the rest
waits and about when it starts.

Ray has no job queue and no job priority (its scheduler places tasks and actors, first come, first served), and
Kueue queues only RayJobs that bring their own cluster, not jobs sent to a long-lived one
(ray-project/ray#63790: a ~10 min job took 3+ hours beside 5 concurrent jobs). So the factory decides when a
whole workload is let onto the shared cluster; Ray still places everything it then starts.

The rule, stated once (the README repeats it):

1. **Order**: lane priority (higher first), then the entry's priority (higher first), then the tenant's
   dominant-resource fair share (lower first: Kueue's admission fair sharing, share = (decayed past usage +
   what it holds now) / weight, usage measured as the dominant resource's fraction of the cluster, decayed
   with a half-life), then enqueue time (older first). Shares are updated as the order is built, so tenants
   interleave by weight.
2. **Start** an entry when it fits the free resources (capacity minus the larger of Ray's live usage and the
   declarations of running entries), its tenant's quota, its lane's tenant and pool quotas, its lane's
   ``max_share``, and leaves other lanes' unused ``guaranteed_share`` alone.
3. **Backfill**: an entry that does not fit does not stop smaller ones behind it, except that once it has
   waited ``reservation_age_s`` it **reserves** what it needs of the free resources: later entries may use only
   what is left, so it is never starved.
4. **Preemption**: an entry of a non-preemptible lane blocked by capacity asks running entries of
   preemptible, lower-priority lanes to yield: the newest single one that frees enough, else the newest
   first until enough, then any of those not needed dropped again (fewest, newest). It then reserves what it
   needs, so what the yielding work frees is its own.

ETAs replay the order against the estimated ends of running work (no backfill assumed: an upper bound).
Everything here is plain arithmetic on small frozen dataclasses; ``tests/unit/test_queue_policy.py`` times a
plan of 1,000 entries from 10 tenants.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aifactory.exceptions import QueueRefused
from aifactory.queue.lanes import LanesConfig

EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Ask:
    """One queue entry as the policy sees it (queued, or running and holding its declaration)."""

    id: str
    tenant: str
    lane: str
    priority: int
    resources: Mapping[str, float]  # Ray's spelling: CPU, GPU, custom
    enqueued_at: float
    name: str = ""
    kind: str = "other"
    pool: str | None = None
    state: str = "queued"  # queued | running | preempting
    started_at: float | None = None
    expected_runtime_s: float | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    position: int  # 1 = the next to start
    reason: str
    eta_s: float | None  # None: no estimate (blocked by a quota or larger than the cluster)
    share: float  # the tenant's fair share when this entry was ordered


@dataclass(frozen=True, slots=True)
class Preempt:
    id: str
    for_id: str
    reason: str


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)
    preempt: list[Preempt] = field(default_factory=list)
    waiting: dict[str, Wait] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)  # tenant -> share before this plan's starts
    order: list[str] = field(default_factory=list)  # every queued entry, in the order it was considered


# ---- resource vectors ---------------------------------------------------------------------------------------

def _nonzero(res: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in res.items() if v and float(v) > EPS}


def _add(into: dict[str, float], res: Mapping[str, float], sign: float = 1.0) -> None:
    for k, v in res.items():
        into[k] = into.get(k, 0.0) + sign * v


def _fits(res: Mapping[str, float], avail: Mapping[str, float]) -> bool:
    for k, v in res.items():
        if v > avail.get(k, 0.0) + EPS:
            return False
    return True


def _short(res: Mapping[str, float], avail: Mapping[str, float]) -> tuple[str, float, float] | None:
    """The first resource ``res`` needs more of than ``avail`` has: (name, needed, available)."""
    for k, v in res.items():
        have = avail.get(k, 0.0)
        if v > have + EPS:
            return k, v, max(0.0, have)
    return None


def dominant_share(res: Mapping[str, float], capacity: Mapping[str, float]) -> float:
    """The largest fraction of the cluster ``res`` asks of any one resource (inf: one the cluster lacks)."""
    share = 0.0
    for k, v in res.items():
        if v <= EPS:
            continue
        cap = capacity.get(k, 0.0)
        share = max(share, math.inf if cap <= EPS else v / cap)
    return share


def decayed_usage(history: Iterable[tuple[str, Mapping[str, float], float, float | None]], *,
                  capacity: Mapping[str, float], now: float, half_life_s: float) -> dict[str, float]:
    """Tenant -> past usage, each holding's dominant share integrated over its run with weight
    ``2 ** -(age / half_life_s)``, times ln 2 / half_life_s (so a tenant that held a fraction ``d`` of the
    cluster for ever reads ``d``). ``history``: (tenant, resources, started_at, finished_at or None)."""
    k = math.log(2) / half_life_s
    out: dict[str, float] = defaultdict(float)
    for tenant, res, start, end in history:
        d = dominant_share(res, capacity)
        if not math.isfinite(d) or d <= 0:
            continue
        end = now if end is None else min(end, now)
        if end <= start:
            continue
        # integral of d * exp(-k (now - t)) dt over [start, end], times k
        out[tenant] += d * (math.exp(-k * (now - end)) - math.exp(-k * (now - start)))
    return dict(out)


# ---- refusals at the door -----------------------------------------------------------------------------------

def check_request(ask: Ask, *, lanes: LanesConfig, capacity: Mapping[str, float] | None) -> None:
    """Raise :class:`QueueRefused` naming the field and the limit when ``ask`` could never start as asked."""
    lane = lanes.lanes.get(ask.lane)
    if lane is None:
        raise QueueRefused("lane", ask.lane, f"one of {sorted(lanes.lanes)}", "name a configured lane (lanes.yaml)")
    if lane.allowed_tenants is not None and ask.tenant not in lane.allowed_tenants:
        raise QueueRefused(f"lanes.{ask.lane}.allowed_tenants", ask.tenant, sorted(lane.allowed_tenants),
                           f"tenant {ask.tenant!r} may not queue in lane {ask.lane!r}; pick another --lane")
    if not lane.min_priority <= ask.priority <= lane.max_priority:
        raise QueueRefused("priority", ask.priority, f"[{lane.min_priority}, {lane.max_priority}]",
                           f"lane {ask.lane!r} takes priorities in that range")
    if lane.change_control and not any(fnmatch.fnmatchcase(ask.name, p) for p in lane.templates):
        raise QueueRefused(f"lanes.{ask.lane}.templates", ask.name[:80], lane.templates,
                           f"lane {ask.lane!r} is under change control: only registered recipes and templates "
                           "run there; use the learning lane for experiments")
    for k, v in sorted(lane.tenant_quota.limits().items()):
        if ask.resources.get(k, 0.0) > v + EPS:
            raise QueueRefused(f"lanes.{ask.lane}.tenant_quota.{k.lower()}", ask.resources[k], v,
                               "the request alone is over the lane's per-tenant quota")
    if ask.pool is not None and ask.pool in lane.pool_quota:
        for k, v in sorted(lane.pool_quota[ask.pool].limits().items()):
            if ask.resources.get(k, 0.0) > v + EPS:
                raise QueueRefused(f"lanes.{ask.lane}.pool_quota.{ask.pool}.{k.lower()}", ask.resources[k], v,
                                   "the request alone is over the lane's quota in that pool")
    if capacity:
        check_fits(ask, lane=lane, capacity=capacity)


def check_fits(ask: Ask, *, lane, capacity: Mapping[str, float]) -> None:
    """Raise :class:`QueueRefused` when ``ask`` is larger than the whole cluster or than ``lane`` may ever hold
    of it. Apart from :func:`check_request`, so that the queue's door can name a tenant's own quota first."""
    if capacity:
        short = _short(ask.resources, capacity)
        if short is not None:
            name, need, cap = short
            raise QueueRefused(f"resources.{name}", need, cap, "larger than the whole cluster: it could never start")
        cap_share = lane.max_share
        if dominant_share(ask.resources, capacity) > cap_share + EPS:
            raise QueueRefused(f"lanes.{ask.lane}.max_share", round(dominant_share(ask.resources, capacity), 4),
                               cap_share, "larger than the lane may ever hold of the cluster")


# ---- the plan -----------------------------------------------------------------------------------------------

def plan(*, queued: Iterable[Ask], running: Iterable[Ask], capacity: Mapping[str, float],
         used: Mapping[str, float] | None, lanes: LanesConfig, past_usage: Mapping[str, float] | None = None,
         tenant_held: Mapping[str, Mapping[str, float]] | None = None,
         tenant_limits: Mapping[str, Mapping[str, float]] | None = None, now: float,
         runtime_s: Callable[[Ask], float] | None = None) -> Plan:
    """What to start and preempt now, and why each other queued entry waits (see the module's rule).

    ``capacity``: the cluster's total resources; ``used``: Ray's live usage of everything (plain ``ray job
    submit`` work included; None: unknown, only declarations count); ``running``: entries started by the
    queue (running or preempting), holding their declarations; ``past_usage``: :func:`decayed_usage`;
    ``tenant_held`` / ``tenant_limits``: each tenant's live holdings and quota limits (budgets.yaml) in Ray's
    spelling; ``runtime_s``: expected runtime of an entry (ETAs)."""
    queued = [q for q in queued if q.state == "queued"]
    running = list(running)
    capacity = {k: float(v) for k, v in capacity.items() if v and v > 0}
    past_usage = past_usage or {}
    tenant_held = {t: dict(v) for t, v in (tenant_held or {}).items()}
    tenant_limits = tenant_limits or {}
    runtime_s = runtime_s or (lambda a: a.expected_runtime_s or lanes.default_runtime_s)
    out = Plan()

    declared: dict[str, float] = {}
    lane_held: dict[str, dict[str, float]] = defaultdict(dict)
    tenant_lane_held: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    pool_lane_held: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    holding_now: dict[str, float] = defaultdict(float)  # tenant -> dominant share held by its running entries
    pending_free: dict[str, float] = {}  # what preempting entries will give back
    declared_by_tenant: dict[str, dict[str, float]] = defaultdict(dict)
    for r in running:
        _add(declared, r.resources)
        _add(lane_held[r.lane], r.resources)
        _add(tenant_lane_held[(r.tenant, r.lane)], r.resources)
        if r.pool is not None:
            _add(pool_lane_held[(r.pool, r.lane)], r.resources)
        holding_now[r.tenant] += min(1.0, dominant_share(r.resources, capacity))
        if r.state == "preempting":
            _add(pending_free, r.resources)
        _add(declared_by_tenant[r.tenant], r.resources)
    # A tenant's quota counts the larger of the meter's holdings and what the queue started for it (the meter
    # sees a start one sample late).
    for t, mine in declared_by_tenant.items():
        held = tenant_held.setdefault(t, {})
        for k, v in mine.items():
            held[k] = max(held.get(k, 0.0), v)
    live = used or {}
    free = {k: cap - max(live.get(k, 0.0), declared.get(k, 0.0)) for k, cap in capacity.items()}

    weights = {t: float(w) for t, w in lanes.tenant_weights.items()}
    lane_cfg = dict(lanes.lanes)

    def weight(tenant: str) -> float:
        return weights.get(tenant, 1.0)

    def share_of(tenant: str) -> float:
        return (past_usage.get(tenant, 0.0) + holding_now[tenant]) / weight(tenant)

    out.shares = {t: share_of(t) for t in {a.tenant for a in queued} | {r.tenant for r in running}}

    # 1. the order: bands of (lane priority, entry priority); within a band, the tenant of least share next
    bands: dict[tuple[int, int], dict[str, list[Ask]]] = defaultdict(lambda: defaultdict(list))
    for a in queued:
        lane = lane_cfg.get(a.lane)
        bands[(-(lane.priority if lane else -1), -a.priority)][a.tenant].append(a)
    order: list[tuple[Ask, float]] = []
    dom: dict[str, float] = {}
    demand_share = dict(holding_now)
    for key in sorted(bands):
        per_tenant = bands[key]
        heap = []
        for t, asks in per_tenant.items():
            asks.sort(key=lambda a: (a.enqueued_at, a.id), reverse=True)  # pop() takes the oldest
            heap.append(((past_usage.get(t, 0.0) + demand_share.get(t, 0.0)) / weight(t),
                         asks[-1].enqueued_at, t))
        heapq.heapify(heap)
        while heap:
            share, _, t = heapq.heappop(heap)
            a = per_tenant[t].pop()
            order.append((a, share))
            dom[a.id] = d = min(1.0, dominant_share(a.resources, capacity))
            demand_share[t] = demand_share.get(t, 0.0) + d
            if per_tenant[t]:
                heapq.heappush(heap, ((past_usage.get(t, 0.0) + demand_share[t]) / weight(t),
                                      per_tenant[t][-1].enqueued_at, t))
    out.order = [a.id for a, _ in order]

    # 2. walk the order: start, preempt, reserve, or wait with a reason
    reserved: dict[str, float] = {}
    victims = sorted((r for r in running if r.state == "running"
                      and (lanes.lanes.get(r.lane) is not None and lanes.lanes[r.lane].preemption.preemptible)),
                     key=lambda r: (r.started_at or 0.0, r.id), reverse=True)  # newest first
    chosen: set[str] = set()
    reasons: dict[str, str] = {}
    eta_blocked: set[str] = set()
    started: list[Ask] = []
    lane_quota = {name: cfg.tenant_quota.limits() for name, cfg in lane_cfg.items()}
    protected_of: dict[str, dict[str, float]] = {}  # per lane, until the next start changes what lanes hold
    for a, share in order:
        lane = lane_cfg.get(a.lane)
        if lane is None:
            reasons[a.id] = f"lane {a.lane!r} is no longer configured"
            eta_blocked.add(a.id)
            continue
        short = _short(a.resources, capacity)
        if short is not None:
            reasons[a.id] = f"larger than the cluster: needs {short[1]:g} {short[0]}, the cluster has {short[2]:g}"
            eta_blocked.add(a.id)
            continue
        why = None
        if a.tenant in tenant_limits or lane_quota[a.lane] or lane.max_share < 1.0 or a.pool is not None:
            why = _limit_reason(a, lane=lane, quota=lane_quota[a.lane], capacity=capacity, tenant_held=tenant_held,
                                tenant_limits=tenant_limits, lane_held=lane_held, tenant_lane_held=tenant_lane_held,
                                pool_lane_held=pool_lane_held)
        if why is not None:
            reasons[a.id] = why
            eta_blocked.add(a.id)
            continue
        protected = protected_of.get(a.lane)
        if protected is None:
            protected = protected_of[a.lane] = _protected(a.lane, lanes=lanes, capacity=capacity, lane_held=lane_held)
        avail = {k: free.get(k, 0.0) - reserved.get(k, 0.0) - protected.get(k, 0.0) for k in capacity}
        if _fits(a.resources, avail):
            out.start.append(a.id)
            started.append(a)
            protected_of.clear()
            _add(free, a.resources, -1)
            _add(lane_held[a.lane], a.resources)
            _add(tenant_lane_held[(a.tenant, a.lane)], a.resources)
            if a.pool is not None:
                _add(pool_lane_held[(a.pool, a.lane)], a.resources)
            _add(tenant_held.setdefault(a.tenant, {}), a.resources)
            holding_now[a.tenant] += dom[a.id]
            continue
        name, need, have = _short(a.resources, avail)
        waited = now - a.enqueued_at
        reason = f"waiting for {name}: needs {need:g}, {have:g} free"
        if reserved.get(name, 0.0) > EPS:
            reason += f" ({reserved[name]:g} reserved for older work)"
        reserve = waited >= lanes.reservation_age_s
        if not lane.preemption.preemptible:
            # what is free to it, plus what yielding work will give back
            room = {k: avail.get(k, 0.0) + pending_free.get(k, 0.0) for k in capacity}
            if _fits(a.resources, room):
                reason, reserve = "waiting for preempted work to yield", True
            else:
                pick = _choose_victims(a, room, [v for v in victims if v.id not in chosen and
                                                 lanes.lanes[v.lane].priority < lane.priority])
                if pick:
                    for v in pick:
                        chosen.add(v.id)
                        _add(pending_free, v.resources)
                        out.preempt.append(Preempt(v.id, a.id, f"lane {a.lane!r} entry {a.id} needs "
                                                   f"{_fmt(a.resources)}; {v.lane!r} is preemptible"))
                    # it takes what they free: nobody else may
                    _add(pending_free, {k: -min(v, pending_free.get(k, 0.0)) for k, v in a.resources.items()})
                    reason, reserve = f"preempting {', '.join(v.id for v in pick)}", True
        if reserve:
            take = {k: max(0.0, min(v, free.get(k, 0.0) - reserved.get(k, 0.0))) for k, v in a.resources.items()}
            _add(reserved, take)
            if waited >= lanes.reservation_age_s:
                reason += f"; waited {waited:.0f} s (> {lanes.reservation_age_s:g} s): holding its resources"
        reasons[a.id] = reason

    # 3. positions and ETAs: replay the waiting order against the estimated ends of running work
    events: list[tuple[float, int, dict[str, float]]] = []
    seq = 0
    for r in running:
        end = (r.started_at or now) + runtime_s(r)
        events.append((max(now, end), seq, dict(r.resources)))
        seq += 1
    for a in started:
        events.append((now + runtime_s(a), seq, dict(a.resources)))
        seq += 1
    heapq.heapify(events)
    sim_free = dict(free)
    t = now
    position = 0
    started_ids = set(out.start)
    for a, share in order:
        if a.id in started_ids:
            continue
        position += 1
        eta: float | None = None
        if a.id not in eta_blocked:
            while not _fits(a.resources, sim_free) and events:
                end, _, res = heapq.heappop(events)
                t = max(t, end)
                _add(sim_free, res)
            if _fits(a.resources, sim_free):
                eta = max(0.0, t - now)
                _add(sim_free, a.resources, -1)
                heapq.heappush(events, (t + runtime_s(a), seq, dict(a.resources)))
                seq += 1
        out.waiting[a.id] = Wait(position=position, reason=reasons.get(a.id, "waiting"), eta_s=eta, share=share)
    return out


def _fmt(res: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items())) or "nothing"


def _limit_reason(a: Ask, *, lane, quota: Mapping[str, float], capacity, tenant_held, tenant_limits, lane_held,
                  tenant_lane_held, pool_lane_held) -> str | None:
    """Why ``a`` may not start whatever is free (a quota or the lane's cap), or None."""
    held = tenant_held.get(a.tenant, {})
    for k, limit in sorted((tenant_limits.get(a.tenant) or {}).items()):
        need = a.resources.get(k, 0.0)
        if need and held.get(k, 0.0) + need > limit + EPS:
            return f"tenant quota: {a.tenant} holds {held.get(k, 0.0):g} of its {limit:g} {k}, needs {need:g} more"
    mine = tenant_lane_held.get((a.tenant, a.lane), {})
    for k, limit in sorted(quota.items()):
        need = a.resources.get(k, 0.0)
        if need and mine.get(k, 0.0) + need > limit + EPS:
            return (f"lane quota: {a.tenant} holds {mine.get(k, 0.0):g} of lane {a.lane!r}'s {limit:g} {k} "
                    "per tenant")
    if a.pool is not None and a.pool in lane.pool_quota:
        in_pool = pool_lane_held.get((a.pool, a.lane), {})
        for k, limit in sorted(lane.pool_quota[a.pool].limits().items()):
            need = a.resources.get(k, 0.0)
            if need and in_pool.get(k, 0.0) + need > limit + EPS:
                return f"pool quota: lane {a.lane!r} holds {in_pool.get(k, 0.0):g} of its {limit:g} {k} in {a.pool}"
    if lane.max_share < 1.0:
        after = dict(lane_held.get(a.lane, {}))
        _add(after, a.resources)
        if dominant_share(after, capacity) > lane.max_share + EPS:
            return (f"lane cap: lane {a.lane!r} would hold {dominant_share(after, capacity):.0%} of the cluster "
                    f"(max_share {lane.max_share:g})")
    return None


def _protected(lane_name: str, *, lanes: LanesConfig, capacity, lane_held) -> dict[str, float]:
    """What other lanes' unused guaranteed shares keep from ``lane_name``'s work."""
    out: dict[str, float] = {}
    for name, other in lanes.lanes.items():
        if name == lane_name or other.guaranteed_share <= 0:
            continue
        held = lane_held.get(name, {})
        for k, cap in capacity.items():
            out[k] = out.get(k, 0.0) + max(0.0, other.guaranteed_share * cap - held.get(k, 0.0))
    return out


def _choose_victims(a: Ask, room: Mapping[str, float], candidates: list[Ask]) -> list[Ask]:
    """The fewest, newest running entries whose resources, added to ``room``, let ``a`` fit ([] if none do)."""
    def fits_with(picked: list[Ask]) -> bool:
        total = dict(room)
        for v in picked:
            _add(total, v.resources)
        return _fits(a.resources, total)

    for v in candidates:  # newest first: the newest single one that is enough
        if fits_with([v]):
            return [v]
    picked: list[Ask] = []
    for v in candidates:
        picked.append(v)
        if fits_with(picked):
            break
    else:
        return []
    for v in list(reversed(picked)):  # drop the oldest ones first that are not needed
        rest = [p for p in picked if p is not v]
        if fits_with(rest):
            picked = rest
    return picked


__all__ = ["Ask", "Plan", "Preempt", "Wait", "check_fits", "check_request", "decayed_usage", "dominant_share", "plan"]
