"""What one short piece of work held, read the way the meter reads the cluster, and what that cost.

A benchmark trial lasts seconds; the ledger commits minute windows a minute late and sums each holder per
window, so a trial's usage cannot be read back from it. :func:`held_by` reads the sources the collector
reads (:mod:`aifactory.cost.sampler`): the state API's actors with their resources and node, the GCS actor
table's exact start and end times, and each node's accelerator SKU, pool and pricing class. It takes the
actors the work names (the replicas of a Serve application, the workers of a Ray Train run's placement
group), clips their spans to the work's measured interval and keys their resource-seconds the way the
ledger does. :meth:`Held.records` turns them into :class:`~aifactory.cost.records.UsageRecord` rows, which
:func:`~aifactory.cost.pricing.price` prices as it prices the ledger's: a GPU-second at its node's SKU.

A placement group's actors ask for ``CPU_group_<pg>`` rather than ``CPU``; those are counted as the plain
resource (:func:`pg_resources`). What a group reserved beyond what its actors asked for, and the minutes
between a group's creation and its first actor, are not in a trial's figure: it is what the trial's
actors held, not what Ray set aside for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aifactory.cost.attribution import ResourceKey, split_key
from aifactory.cost.pricebook import PriceBook
from aifactory.cost.pricing import price
from aifactory.cost.records import PricingClass, Resource, UsageRecord

_GROUP = re.compile(r"^(?P<name>.+)_group_(?P<pg>[0-9a-f]+)$")  # not the per-bundle `CPU_group_0_<pg>`


def pg_resources(required: Mapping[str, float]) -> dict[str, float]:
    """An actor's resources as plain Ray names: ``CPU_group_<pg>`` -> ``CPU`` (the per-bundle
    ``CPU_group_<i>_<pg>`` duplicates and the ``bundle`` markers dropped); other names as they are."""
    out: dict[str, float] = {}
    for name, amount in (required or {}).items():
        m = _GROUP.match(name)
        if m is None:
            if "_group_" not in name:
                out[name] = out.get(name, 0.0) + float(amount)
            continue
        base = m.group("name")
        if base == "bundle":
            continue
        out[base] = out.get(base, 0.0) + float(amount)
    return out


@dataclass(frozen=True)
class Span:
    """One actor's holding: its keyed resources over [start, end)."""

    holder: str
    resources: Mapping[ResourceKey, float]
    start: float
    end: float


@dataclass(frozen=True)
class Held:
    """Resource-seconds the named actors held in [since, until)."""

    since: float
    until: float
    spans: tuple[Span, ...] = ()
    estimated: bool = False  # some edge was not Ray's own time (no GCS actor table): clipped to the interval
    missing: tuple[str, ...] = field(default=())  # what was asked for and not found

    def resource_s(self) -> dict[ResourceKey, float]:
        out: dict[ResourceKey, float] = {}
        for s in self.spans:
            for key, amount in s.resources.items():
                out[key] = out.get(key, 0.0) + amount * max(0.0, s.end - s.start)
        return out

    def seconds(self, resource: str) -> float:
        """Resource-seconds of one resource (``cpu``, ``gpu``, ``memory``: GiB-s, ``asic``), every SKU."""
        return sum(v for k, v in self.resource_s().items() if split_key(k)[0] == resource)

    def skus(self, resource: str) -> list[str]:
        return sorted({split_key(k)[1] for k in self.resource_s() if split_key(k)[0] == resource})

    def records(self, *, tenant: str, region: str, workload: str = "bench",
                pricing_class: PricingClass = PricingClass.ON_DEMAND) -> list[UsageRecord]:
        """One usage record per resource key, as the ledger would hold them for this interval."""
        out = []
        for key, quantity in sorted(self.resource_s().items()):
            resource, sku, pool, cls = split_key(key)
            out.append(UsageRecord(window_start=self.since, window_end=max(self.until, self.since + 1e-9),
                                   tenant=tenant, workload=workload, holder="metered", resource=Resource(resource),
                                   sku=sku, region=region, pool=pool, quantity_s=quantity,
                                   pricing_class=PricingClass(cls) if cls else pricing_class,
                                   estimated=self.estimated))
        return out

    def usd(self, book: PriceBook, *, tenant: str, region: str) -> float:
        """Priced with ``book`` (raises PriceNotFound when the book lacks a SKU the work held)."""
        return sum(price(r, book).usd for r in self.records(tenant=tenant, region=region))


def spans_of(actors: Iterable, times: Mapping[str, tuple[float | None, float | None]] | None, *,
             since: float, until: float, node_keys: Mapping[str, Mapping], keys) -> tuple[list[Span], bool]:
    """Pure: state-API actor rows (``actor_id``, ``required_resources``, ``node_id``) and their GCS times ->
    spans clipped to [since, until). ``keys(resources, node_keys_of_its_node)`` keys Ray's resource names.
    A live actor without times (``times`` None or no row) is taken as holding the whole interval, a dead one
    as holding none of it; either way the result is estimated."""
    out, estimated = [], False
    for a in actors:
        start, end = (times or {}).get(a.actor_id, (None, None))
        if start is None:
            estimated = True
            if getattr(a, "state", "ALIVE") != "ALIVE":
                continue
        lo, hi = max(since, start or since), min(until, end or until)
        if hi <= lo:
            continue
        res = keys(pg_resources(a.required_resources or {}), node_keys.get(a.node_id or "") or {})
        if res:
            out.append(Span(f"actor:{a.actor_id}", res, lo, hi))
    return out, estimated


def held_by(*, since: float, until: float, dashboard_url: str, apps: Iterable[str] = (),
            placement_groups: Iterable[str] = (), timeout_s: int = 30) -> Held:
    """What the replicas of the Serve ``apps`` and the actors of ``placement_groups`` (a Train run's workers)
    held in [since, until), from the state API at ``dashboard_url`` and the GCS actor table (this process
    must be a connected Ray driver for the exact times; without them the interval is taken whole and the
    result says ``estimated``)."""
    from ray.util import state

    from aifactory import ray_compat
    from aifactory.cost.sampler import _accelerators, node_key_args, resource_keys

    kw = {"address": dashboard_url, "timeout": timeout_s, "raise_on_missing_output": False}
    nodes = state.list_nodes(detail=True, limit=10000, **kw)
    node_keys = node_key_args(nodes)
    fallback = dict(zip(("accelerator", "asic_sku"), _accelerators(nodes)))
    apps, groups = set(apps), set(placement_groups)
    chosen, found = [], set()
    for a in state.list_actors(detail=True, limit=10000, **kw):
        cls_name = a.class_name or ""
        app = cls_name.split(":")[1] if cls_name.startswith("ServeReplica:") and cls_name.count(":") >= 2 else None
        if app in apps or (a.placement_group_id and a.placement_group_id in groups):
            chosen.append(a)
            found.add(app if app in apps else a.placement_group_id)
    try:
        times = ray_compat.actor_times()
    except ray_compat.RayCompatError:
        times = None
    spans, estimated = spans_of(chosen, times, since=since, until=until, node_keys=node_keys,
                                keys=lambda res, nk: resource_keys(res, **(nk or fallback)))
    missing = tuple(sorted((apps | groups) - found))
    return Held(since=since, until=until, spans=tuple(spans), estimated=estimated or times is None, missing=missing)


__all__ = ["Held", "Span", "held_by", "pg_resources", "spans_of"]
