"""Pure attribution: who held which capacity when, turned into per-tenant resource-seconds.

Two pieces, neither touching Ray:

- :class:`Tracker` turns periodic snapshots of holders (jobs, actors, tasks, placement groups) into
  intervals. Where Ray reports a start or end time it is used exactly; where it does not, the edge is
  put at the midpoint between the two samples that bracket it (error <= half the sampling period).
  After an outage (samples further apart than ``max_gap_s``) a midpoint could be wrong by half the
  outage, so an unseen edge is not guessed: the holder is billed up to the last sample that saw it
  (or from the first), and the gap is a holding of the pseudo-tenant ``unknown``.
- :func:`attribute` sweeps the intervals of one window against the cluster's capacity and returns
  usage records for every holder, plus ``unattributed`` (untagged holders), ``idle`` (capacity that
  nothing held) and ``unknown`` (outage gaps), such that per resource and node pool: sum of records ==
  capacity x window length. If holders momentarily claim more than the capacity (a sampling race), they
  are scaled down to it, so the invariant holds by construction.

Resources are keyed by :data:`ResourceKey`: ``(resource, sku)`` on nodes without pool labels, and
``(resource, sku, pool, pricing_class)`` on a labelled node (see :func:`resource_key`), so each pool's
capacity is a separate line with its own idle, and every record says which pool it was held on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from aifactory.cost.records import DEFAULT_POOL, UNKNOWN, PricingClass, Resource, UsageRecord
from aifactory.tenancy import IDLE

# (resource, sku), e.g. ("cpu", "cpu"), ("gpu", "H100"); on a labelled node (resource, sku, pool,
# pricing_class), e.g. ("gpu", "H100", "train-gpu-spot", "spot"); pricing_class "" = the collector's.
ResourceKey = tuple[str, ...]


def resource_key(resource: str, sku: str, pool: str = DEFAULT_POOL, pricing_class: str = "") -> ResourceKey:
    """The key of a resource on a node of ``pool``: the plain ``(resource, sku)`` for unlabelled nodes."""
    if pool == DEFAULT_POOL and not pricing_class:
        return (resource, sku)
    return (resource, sku, pool, pricing_class)


def split_key(key: ResourceKey) -> tuple[str, str, str, str]:
    """``(resource, sku, pool, pricing_class)`` of any key."""
    if len(key) >= 4:
        return key[0], key[1], key[2], key[3]
    return key[0], key[1], DEFAULT_POOL, ""


def keys_to_json(resources: Mapping[ResourceKey, float]) -> list[list]:
    return [[*k, v] for k, v in resources.items()]


def keys_from_json(rows) -> dict[ResourceKey, float]:
    """Inverse of :func:`keys_to_json`; also reads the ``[resource, sku, v]`` rows of older state."""
    return {tuple(row[:-1]): float(row[-1]) for row in rows}


@dataclass(frozen=True)
class Holding:
    """One holder of capacity over [start, end) (``end`` None = still holding)."""

    holder: str
    tenant: str
    resources: Mapping[ResourceKey, float]
    start: float | None = None
    end: float | None = None
    project: str = "default"
    workload: str = "other"
    job_id: str = ""
    deployment: str = ""
    # Shared Serve deployments: tenant -> weight (e.g. processing seconds); None = all to ``tenant``.
    shares: Mapping[str, float] | None = None
    # The sampler fell back from Ray's times to estimated edges (e.g. no GCS actor table): its records say so.
    estimated: bool = False

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("holder", "tenant", "start", "end", "project", "workload",
                                           "job_id", "deployment", "estimated")}
        d["resources"] = keys_to_json(self.resources)
        d["shares"] = dict(self.shares) if self.shares else None
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> Holding:
        d = dict(d)
        d["resources"] = keys_from_json(d["resources"])
        return cls(**d)


@dataclass(frozen=True)
class CapacityPoint:
    """Cluster capacity from ``t`` until the next point."""

    t: float
    resources: Mapping[ResourceKey, float]


@dataclass
class Tracker:
    """Snapshots -> intervals. Serializable (:meth:`to_json`) so a restarted collector resumes."""

    open: dict[str, Holding] = field(default_factory=dict)
    closed: dict[str, Holding] = field(default_factory=dict)
    last_t: float | None = None
    horizon: float = 0.0  # intervals ending before this were committed; ignore them if seen again
    # Samples further apart than this are an outage (the collector sets 3 sample intervals); None: never.
    max_gap_s: float | None = None
    # Outage gaps: tenant UNKNOWN holdings over [last sample, next sample) of holders whose edge fell there.
    gaps: list[Holding] = field(default_factory=list)

    def observe(self, t: float, observed: Iterable[Holding]) -> None:
        prev = self.last_t
        outage = prev is not None and self.max_gap_s is not None and t - prev > self.max_gap_s
        seen = set()
        for obs in observed:
            if obs.end is not None and obs.end <= self.horizon:
                continue
            if obs.holder in self.closed:
                # Seen again after we inferred its end (a partial state-API answer, a restart): it never
                # stopped holding. Reopen it, or take the end Ray now reports.
                gone = self.closed[obs.holder]
                self._drop_gaps(obs.holder, since=gone.end)  # its end is known now: no unknown after it
                if obs.end is not None:
                    self.closed[obs.holder] = replace(gone, end=obs.end)
                else:
                    del self.closed[obs.holder]
                    self.open[obs.holder] = replace(obs, start=gone.start, end=None)
                seen.add(obs.holder)
                continue
            seen.add(obs.holder)
            current = self.open.get(obs.holder)
            if current is None:
                start = obs.start
                if start is None and outage:
                    start = t
                    self._add_gap(obs, prev, t)
                elif start is None:
                    start = t if prev is None else (prev + t) / 2
                current = replace(obs, start=start)
            else:
                # Keep the start we resolved first; take fresh metadata (shares move with traffic).
                current = replace(obs, start=current.start)
            if current.end is not None:
                self.open.pop(obs.holder, None)
                self.closed[obs.holder] = current
            else:
                self.open[obs.holder] = current
        for holder in [h for h in self.open if h not in seen]:
            gone = self.open.pop(holder)
            if outage:
                end = max(prev, gone.start or prev)
                self._add_gap(gone, end, t)
            else:
                end = t if prev is None else (prev + t) / 2
            self.closed[holder] = replace(gone, end=max(end, gone.start or end))
        self.last_t = t

    def _add_gap(self, h: Holding, start: float, end: float) -> None:
        if end > start:
            self.gaps.append(Holding(h.holder, UNKNOWN, h.resources, start=start, end=end, workload=h.workload,
                                     job_id=h.job_id, deployment=h.deployment))

    def _drop_gaps(self, holder: str, *, since: float) -> None:
        self.gaps = [g for g in self.gaps if not (g.holder == holder and (g.start or 0.0) >= since)]

    def holdings(self) -> list[Holding]:
        return [*self.open.values(), *self.closed.values(), *self.gaps]

    def prune(self, before: float) -> None:
        """Forget intervals that ended before ``before`` (their windows are committed)."""
        self.horizon = max(self.horizon, before)
        for holder in [h for h, v in self.closed.items() if v.end is not None and v.end <= before]:
            del self.closed[holder]
        self.gaps = [g for g in self.gaps if g.end is None or g.end > before]

    def pruned(self, before: float) -> Tracker:
        """A copy of this tracker after :meth:`prune`; this one is left as it was, so that a commit that
        fails can be retried from it."""
        out = replace(self, open=dict(self.open), closed=dict(self.closed), gaps=list(self.gaps))
        out.prune(before)
        return out

    def to_json(self) -> dict:
        return {
            "open": [h.to_json() for h in self.open.values()],
            "closed": [h.to_json() for h in self.closed.values()],
            "last_t": self.last_t,
            "horizon": self.horizon,
            "max_gap_s": self.max_gap_s,
            "gaps": [h.to_json() for h in self.gaps],
        }

    @classmethod
    def from_json(cls, d: Mapping | None) -> Tracker:
        if not d:
            return cls()
        return cls(
            open={h["holder"]: Holding.from_json(h) for h in d.get("open", [])},
            closed={h["holder"]: Holding.from_json(h) for h in d.get("closed", [])},
            last_t=d.get("last_t"),
            horizon=d.get("horizon", 0.0),
            max_gap_s=d.get("max_gap_s"),
            gaps=[Holding.from_json(h) for h in d.get("gaps", [])],
        )


def capacity_at(points: Sequence[CapacityPoint], t: float) -> Mapping[ResourceKey, float]:
    """The capacity in force at ``t`` (the latest point at or before ``t``; the first one before that)."""
    if not points:
        return {}
    current = points[0].resources
    for p in points:
        if p.t <= t:
            current = p.resources
        else:
            break
    return current


def attribute(
    holdings: Sequence[Holding],
    capacity: Sequence[CapacityPoint],
    window_start: float,
    window_end: float,
    *,
    region: str = "local",
    pricing_class: PricingClass = PricingClass.ON_DEMAND,
) -> list[UsageRecord]:
    """Usage records of one window: every holder's share (``unknown`` for outage gaps), and ``idle`` for
    the rest of the capacity.

    Per resource key, i.e. per node pool: records on a pool's keys carry that pool and its pricing class
    (``pricing_class`` where the node declared none); ``region`` and ``pricing_class`` apply otherwise.
    """
    if window_end <= window_start:
        raise ValueError(f"empty window [{window_start}, {window_end})")
    points = sorted(capacity, key=lambda p: p.t)
    cuts = {window_start, window_end}
    for h in holdings:
        for edge in (h.start, h.end):
            if edge is not None and window_start < edge < window_end:
                cuts.add(edge)
    for p in points:
        if window_start < p.t < window_end:
            cuts.add(p.t)
    edges = sorted(cuts)
    # (holding index, resource key) -> seconds; idle per resource key.
    held_s: dict[tuple[int, ResourceKey], float] = defaultdict(float)
    idle_s: dict[ResourceKey, float] = defaultdict(float)
    for a, b in zip(edges, edges[1:]):
        dt = b - a
        cap = capacity_at(points, a)
        active = [
            (i, h) for i, h in enumerate(holdings)
            if (h.start is None or h.start <= a) and (h.end is None or h.end >= b)
        ]
        demand: dict[ResourceKey, float] = defaultdict(float)
        for _, h in active:
            for key, amount in h.resources.items():
                demand[key] += amount
        for key in set(cap) | set(demand):
            total = cap.get(key, 0.0)
            want = demand.get(key, 0.0)
            scale = 1.0 if want <= total else (total / want if want > 0 else 0.0)
            for i, h in active:
                amount = h.resources.get(key, 0.0)
                if amount > 0:
                    held_s[(i, key)] += amount * scale * dt
            idle_s[key] += max(0.0, total - want * scale) * dt
    out: dict[tuple, float] = defaultdict(float)
    estimated: set[str] = set()  # holders with an estimated holding in the window: all their records say so
    for (i, key), seconds in held_s.items():
        h = holdings[i]
        if h.estimated:
            estimated.add(h.holder)
        for tenant, project, fraction in _split(h):
            out[(tenant, project, h.workload, h.job_id, h.deployment, h.holder, key)] += seconds * fraction
    for key, seconds in idle_s.items():
        out[(IDLE, "default", "idle", "", "", "", key)] += seconds
    records = []
    for (tenant, project, workload, job_id, deployment, holder, key), seconds in sorted(out.items()):
        if seconds <= 0:
            continue
        resource, sku, pool, node_class = split_key(key)
        records.append(UsageRecord(
            window_start=window_start, window_end=window_end, tenant=tenant, project=project, workload=workload,
            job_id=job_id, deployment=deployment, holder=holder, resource=Resource(resource), sku=sku,
            region=region, pricing_class=PricingClass(node_class) if node_class else pricing_class, pool=pool,
            quantity_s=seconds, estimated=bool(holder) and holder in estimated,
        ))
    return records


def _split(h: Holding) -> list[tuple[str, str, float]]:
    """(tenant, project, fraction) parts of a holding: by its shares when it has any, else all to its tenant."""
    if h.shares:
        total = sum(v for v in h.shares.values() if v > 0)
        if total > 0:
            parts = []
            for key, v in sorted(h.shares.items()):
                if v > 0:
                    tenant, _, project = key.partition("/")
                    parts.append((tenant, project or "default", v / total))
            return parts
    return [(h.tenant, h.project, 1.0)]


def totals_by(records: Iterable[UsageRecord], *, field_name: str = "tenant") -> dict[tuple[str, str], float]:
    """Sum of resource-seconds by (``field_name`` value, resource)."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for r in records:
        out[(getattr(r, field_name), r.resource.value)] += r.quantity_s
    return dict(out)
