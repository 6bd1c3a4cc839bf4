"""Commitment planner: how much capacity to reserve, and how much to burst on demand.

"Reserve baseline capacity for steady demand and burst into on-demand capacity only for spikes": with a
reserved rate ``r`` and a burst rate ``o`` (on-demand, or spot where the operator bursts there), reserving
``R`` units over a demand series ``d_i`` of buckets lasting ``w_i`` hours costs
``sum_i w_i * (R*r + max(d_i - R, 0)*o)``. That is piecewise linear and convex in ``R`` with kinks at the
demand values, so its minimum lies at a demand value: the weighted ``1 - r/o`` quantile (reserve one more
unit while more than ``r/o`` of the hours would use it). :func:`plan` evaluates every kink (and 0) and picks
the least cost, the smaller reservation on a tie, so ties and small series are exact.

Pure: :func:`demand_series` turns ledger records into the series; rates come from the caller's price book.
Demand is the average units held per bucket (an hour by default), not the peak inside it: a reservation
is bought by the hour.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from aifactory.cost.records import Resource, UsageRecord
from aifactory.tenancy import IDLE

DROP = 0.2  # the "usage falls by 20%" of the over-commitment risk


@dataclass(frozen=True)
class Demand:
    """Average units held per bucket, buckets in time order, and how many hours each bucket covers."""

    units: tuple[float, ...]
    hours: tuple[float, ...]
    start: float  # Unix seconds of the first bucket

    def __len__(self) -> int:
        return len(self.units)


def demand_series(records: Iterable[UsageRecord], *, pool: str, resource: Resource | str = Resource.CPU,
                  bucket_s: float = 3600.0) -> Demand:
    """Units of ``resource`` held in ``pool`` per bucket of ``bucket_s`` from the first record's start (idle
    capacity is not demand; buckets without usage between the first and the last count as 0). The last
    bucket ends at the last record's end, so a history shorter than a bucket is not diluted by time the
    ledger never saw."""
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be > 0 (got {bucket_s})")
    resource = Resource(resource)
    mine = [r for r in records if r.pool == pool and r.resource == resource and r.tenant != IDLE]
    if not mine:
        return Demand(units=(), hours=(), start=0.0)
    t0 = min(r.window_start for r in mine)
    t1 = max(r.window_end for r in mine)
    held: dict[int, float] = defaultdict(float)
    for r in mine:
        held[int((r.window_start - t0) // bucket_s)] += r.quantity_s
    n = int((t1 - t0) // bucket_s) + (1 if (t1 - t0) % bucket_s else 0)
    n = max(n, max(held) + 1)
    spans = [min(bucket_s, t1 - (t0 + i * bucket_s)) for i in range(n)]
    return Demand(units=tuple(held.get(i, 0.0) / spans[i] for i in range(n)),
                  hours=tuple(s / 3600.0 for s in spans), start=t0)


def total_cost(demand: Sequence[float], reserved_units: float, *, reserved_usd_per_hour: float,
               on_demand_usd_per_hour: float, hours: Sequence[float] | None = None) -> float:
    """USD over the series with ``reserved_units`` reserved throughout and the rest bought at the burst rate
    (``on_demand_usd_per_hour``); ``hours`` per bucket, default 1 each."""
    hours = [1.0] * len(demand) if hours is None else hours
    return sum(w * (reserved_units * reserved_usd_per_hour + max(d - reserved_units, 0.0) * on_demand_usd_per_hour)
               for d, w in zip(demand, hours, strict=True))


@dataclass(frozen=True)
class Plan:
    reserved_units: float
    covered_percentile: float  # share of the hours whose demand the reservation covers, in %
    total_usd: float
    all_on_demand_usd: float
    savings_usd: float
    savings_pct: float
    hours: float
    drop_20pct_usd: float  # total cost if demand falls 20% and the reservation stays
    drop_20pct_best_usd: float  # the best cost for that lower demand
    over_commitment_usd: float  # their difference: what committing now risks
    drop_20pct_savings_usd: float  # all on-demand minus the committed cost at the lower demand (< 0: it loses)

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _cost(units, hours, R, r, o) -> float:
    return total_cost(units, R, reserved_usd_per_hour=r, on_demand_usd_per_hour=o, hours=hours)


def _best(units: Sequence[float], hours: Sequence[float], r: float, o: float) -> tuple[float, float]:
    best = min(sorted({0.0, *units}), key=lambda R: (_cost(units, hours, R, r, o), R))
    return best, _cost(units, hours, best, r, o)


def plan(demand: Demand | Sequence[float], *, reserved_usd_per_hour: float, on_demand_usd_per_hour: float
         ) -> Plan:
    """The reservation that minimises total cost over ``demand`` (a :class:`Demand`, or units per hour)."""
    if not isinstance(demand, Demand):
        demand = Demand(units=tuple(demand), hours=(1.0,) * len(demand), start=0.0)
    if not demand.units:
        raise ValueError("plan: the demand series is empty (no usage of this pool and resource in the ledger)")
    r, o = reserved_usd_per_hour, on_demand_usd_per_hour
    if not (math.isfinite(r) and math.isfinite(o)) or r < 0 or o <= 0:
        raise ValueError(f"plan: rates must be finite, reserved >= 0 and on-demand > 0 (got reserved={r}, "
                         f"on_demand={o})")
    units, hours = demand.units, demand.hours
    reserved, cost = _best(units, hours, r, o)
    everything = _cost(units, hours, 0.0, r, o)
    low = [d * (1 - DROP) for d in units]
    _, low_best = _best(low, hours, r, o)
    low_cost = _cost(low, hours, reserved, r, o)
    total_h = sum(hours)
    covered = 100.0 * sum(w for d, w in zip(units, hours) if d <= reserved) / total_h
    return Plan(reserved_units=reserved, covered_percentile=covered, total_usd=cost, all_on_demand_usd=everything,
                savings_usd=everything - cost, savings_pct=100.0 * (everything - cost) / everything if everything else 0.0,
                hours=total_h, drop_20pct_usd=low_cost, drop_20pct_best_usd=low_best,
                over_commitment_usd=low_cost - low_best,
                drop_20pct_savings_usd=_cost(low, hours, 0.0, r, o) - low_cost)


def write_chart(path, demand: Demand, reserved_units: float, *, title: str) -> str:
    """PNG of the demand per bucket and the reserved line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, t = [], 0.0
    for w in demand.hours:
        xs.append(t)
        t += w
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step([*xs, t], [*demand.units, demand.units[-1]], where="post", label="demand (average units held)")
    ax.axhline(reserved_units, color="tab:red", linestyle="--", label=f"reserve {reserved_units:.3g}")
    ax.set_xlabel("hours since the first record")
    ax.set_ylabel("units")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


__all__ = ["Demand", "Plan", "demand_series", "plan", "total_cost", "write_chart"]
