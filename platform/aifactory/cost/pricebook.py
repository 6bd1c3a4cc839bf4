"""The versioned price book: USD per resource-hour by resource, SKU, region and pricing class, and per pool.

``pools`` maps a node pool (the ``aifactory.io/pool`` Ray node label that cluster/ sets) to its pricing
class and/or its own rates, so each pool's node-hours are priced at that pool's rate. A pool's explicit
rate wins; else the book's rate at the pool's pricing class (or the record's, from the node's
``aifactory.io/pricing-class`` label, when the pool declares none). Unknown pools, and ``default`` (nodes
without labels), are priced by the book's rates as before.

The default book ships in the package (``pricebook.default.yaml``); ``<home>/pricebook.yaml`` or an
explicit path replaces it. Loading validates everything at once (duplicate rates, negative prices, a
price that is not a finite number, a missing CPU or memory rate) and raises one
:class:`~aifactory.exceptions.ConfigError`.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from pydantic import Field, FiniteFloat, field_validator, model_validator

from aifactory.config import StrictModel, parse_config, read_yaml
from aifactory.cost.records import DEFAULT_POOL, POOL_NAME, POOL_NAME_RULE, PricingClass, Resource
from aifactory.exceptions import FactoryError

DEFAULT_PATH = Path(__file__).with_name("pricebook.default.yaml")
ANY_REGION = "*"
# A pool name is a Kubernetes label value (it is the aifactory.io/pool label of the pool's nodes).


class PriceNotFound(FactoryError):
    """The price book has no rate for a resource/SKU: a report must not silently price it at zero."""

    def __init__(self, resource: str, sku: str, region: str, version: str):
        self.resource, self.sku, self.region, self.version = resource, sku, region, version
        super().__init__(
            f"price book {version!r} has no rate for resource={resource!r} sku={sku!r} region={region!r}: "
            "add one to the price book (region '*' applies everywhere)"
        )

    def __reduce__(self):
        return (self.__class__, (self.resource, self.sku, self.region, self.version))


class Rate(StrictModel):
    resource: Resource = Field(description="cpu, gpu, memory (GiB) or asic.")
    sku: str = Field(min_length=1, description="'cpu', 'gib' or an accelerator type such as H100, L4.")
    region: str = Field(default=ANY_REGION, min_length=1, description="Region, or '*' for every region.")
    on_demand_usd_per_hour: FiniteFloat = Field(ge=0, description="On-demand USD per resource-hour.")
    reserved_usd_per_hour: FiniteFloat | None = Field(
        default=None, ge=0, description="Reserved (committed) USD per resource-hour; default: on-demand."
    )
    spot_usd_per_hour: FiniteFloat | None = Field(
        default=None, ge=0, description="Spot (preemptible) USD per resource-hour; default: on-demand."
    )

    def usd_per_hour(self, pricing_class: PricingClass) -> float:
        # A class without its own rate costs on-demand: over-stating a cost beats pricing it at zero.
        if pricing_class == PricingClass.RESERVED and self.reserved_usd_per_hour is not None:
            return self.reserved_usd_per_hour
        if pricing_class == PricingClass.SPOT and self.spot_usd_per_hour is not None:
            return self.spot_usd_per_hour
        return self.on_demand_usd_per_hour


def _find(rates, resource: Resource, sku: str, region: str):
    """The rate for (resource, sku) in ``region``, else its region '*' rate, else None."""
    exact = fallback = None
    for r in rates:
        if r.resource == resource and r.sku.lower() == sku.lower():
            if r.region == region:
                exact = r
            elif r.region == ANY_REGION:
                fallback = r
    return exact or fallback


def _duplicates(rates, where: str) -> list[str]:
    seen: set[tuple[str, str, str]] = set()
    problems = []
    for i, r in enumerate(rates):
        k = (r.resource.value, r.sku.lower(), r.region)
        if k in seen:
            problems.append(f"{where}.{i}: duplicate rate for resource={k[0]} sku={r.sku} region={k[2]}")
        seen.add(k)
    return problems


class PoolRate(StrictModel):
    resource: Resource = Field(description="cpu, gpu, memory (GiB) or asic.")
    sku: str = Field(min_length=1, description="'cpu', 'gib' or an accelerator type such as H100, L4.")
    region: str = Field(default=ANY_REGION, min_length=1, description="Region, or '*' for every region.")
    usd_per_hour: FiniteFloat = Field(
        ge=0, description="This pool's USD per resource-hour, whatever its pricing class."
    )


class Pool(StrictModel):
    """How one node pool is priced: a pricing class for the book's rates, its own rates, or both."""

    pricing_class: PricingClass | None = Field(
        default=None,
        description="Price this pool at the book's rates of this class (reserved, on-demand, spot); "
                    "None: the class its nodes' aifactory.io/pricing-class label gives.",
    )
    rates: list[PoolRate] = Field(
        default_factory=list, description="This pool's own rates; they win over the book's for the same resource/SKU."
    )

    @model_validator(mode="after")
    def _check(self) -> Pool:
        problems = _duplicates(self.rates, "rates")
        if self.pricing_class is None and not self.rates:
            problems.append("give the pool a pricing_class and/or rates")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PriceBook(StrictModel):
    """A versioned set of rates. Look rates up with :meth:`rate`."""

    version: str = Field(min_length=1, description="Version label; reports quote it.")
    effective_from: _dt.datetime | None = Field(
        default=None,
        description="When this book comes into force (ISO date or time; UTC when no zone is given); usage "
                    "from then on is priced by it, until a later book's effective_from. None: in force since "
                    "forever (the base book). See aifactory.cost.schedule.",
    )
    currency: str = Field(default="USD", pattern="^USD$", description="Only USD is supported.")
    default_region: str = Field(default="local", description="Region of nodes that declare none.")
    default_pricing_class: PricingClass = Field(
        default=PricingClass.ON_DEMAND, description="Pricing class of usage that declares none."
    )
    rates: list[Rate] = Field(min_length=1, description="The rates.")
    pools: dict[str, Pool] = Field(
        default_factory=dict,
        description="Node pool (aifactory.io/pool label) -> its pricing class and/or own rates; "
                    "pools not listed are priced by `rates` at their nodes' pricing class.",
    )

    @field_validator("effective_from", mode="before")
    @classmethod
    def _date_is_midnight_utc(cls, v):
        # YAML reads `2026-01-01` as a date: the book is in force from that day's start, UTC.
        if isinstance(v, _dt.date) and not isinstance(v, _dt.datetime):
            return _dt.datetime(v.year, v.month, v.day, tzinfo=_dt.timezone.utc)
        return v

    @field_validator("effective_from", mode="after")
    @classmethod
    def _utc(cls, v):
        return v.replace(tzinfo=_dt.timezone.utc) if v is not None and v.tzinfo is None else v

    @property
    def effective_from_ts(self) -> float:
        """Unix seconds from which the book is in force; -inf for a book without effective_from."""
        return float("-inf") if self.effective_from is None else self.effective_from.timestamp()

    @model_validator(mode="after")
    def _check(self) -> PriceBook:
        problems = _duplicates(self.rates, "rates")
        seen = {(r.resource, r.sku.lower(), r.region) for r in self.rates}
        for resource, sku in ((Resource.CPU, "cpu"), (Resource.MEMORY, "gib")):
            if (resource, sku, ANY_REGION) not in seen:
                problems.append(f"rates: a region '*' rate for resource={resource.value} sku={sku} is required")
        for name in self.pools:
            if not POOL_NAME.match(name):
                problems.append(f"pools.{name}: a pool name is {POOL_NAME_RULE}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def rate(self, resource: Resource | str, sku: str, region: str) -> Rate:
        resource = Resource(resource)
        found = _find(self.rates, resource, sku, region)
        if found is None:
            raise PriceNotFound(resource.value, sku, region, self.version)
        return found

    def usd_per_hour(self, resource: Resource | str, sku: str, region: str, *,
                     pricing_class: PricingClass | str | None = None, pool: str = DEFAULT_POOL) -> float:
        """USD per resource-hour on a node of ``pool``: the pool's own rate, else the book's rate at the
        pool's pricing class, else at ``pricing_class`` (the node's), else at the book's default class."""
        resource = Resource(resource)
        entry = self.pools.get(pool)
        if entry is not None:
            own = _find(entry.rates, resource, sku, region)
            if own is not None:
                return own.usd_per_hour
            if entry.pricing_class is not None:
                pricing_class = entry.pricing_class
        cls = PricingClass(pricing_class) if pricing_class is not None else self.default_pricing_class
        return self.rate(resource, sku, region).usd_per_hour(cls)


def parse_price_book(data: dict, *, source: str = "<price book>") -> PriceBook:
    return parse_config(PriceBook, data, source=source)


def load_price_book(path: str | Path | None = None, *, home=None, at: float | None = None) -> PriceBook:
    """The price book at ``path``; else the home's book in force at ``at`` (default: now) of its schedule
    (``<home>/pricebook.yaml`` or the packaged default, and the dated books of ``<home>/pricebooks/``).

    For usage that is priced as it happens (a benchmark trial, an estimate). To price a ledger's history use
    :func:`aifactory.cost.schedule.load_prices`: each record at the book of its own time."""
    if path is not None:
        return parse_price_book(read_yaml(path), source=str(path))
    import time

    from aifactory.cost.schedule import load_prices

    return load_prices(home=home).at(time.time() if at is None else at)
