"""The versioned price book: USD per resource-hour by resource, SKU, region and pricing class.

The default book ships in the package (``pricebook.default.yaml``); ``<home>/pricebook.yaml`` or an
explicit path replaces it. Loading validates everything at once (duplicate rates, negative prices, a
missing CPU or memory rate) and raises one :class:`~aifactory.exceptions.ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from aifactory.config import StrictModel, parse_config, read_yaml
from aifactory.cost.records import PricingClass, Resource
from aifactory.exceptions import FactoryError

DEFAULT_PATH = Path(__file__).with_name("pricebook.default.yaml")
ANY_REGION = "*"


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
    on_demand_usd_per_hour: float = Field(ge=0, description="On-demand USD per resource-hour.")
    reserved_usd_per_hour: float | None = Field(
        default=None, ge=0, description="Reserved (committed) USD per resource-hour; default: on-demand."
    )

    def usd_per_hour(self, pricing_class: PricingClass) -> float:
        if pricing_class == PricingClass.RESERVED and self.reserved_usd_per_hour is not None:
            return self.reserved_usd_per_hour
        return self.on_demand_usd_per_hour


class PriceBook(StrictModel):
    """A versioned set of rates. Look rates up with :meth:`rate`."""

    version: str = Field(min_length=1, description="Version label; reports quote it.")
    currency: str = Field(default="USD", pattern="^USD$", description="Only USD is supported.")
    default_region: str = Field(default="local", description="Region of nodes that declare none.")
    default_pricing_class: PricingClass = Field(
        default=PricingClass.ON_DEMAND, description="Pricing class of usage that declares none."
    )
    rates: list[Rate] = Field(min_length=1, description="The rates.")

    @model_validator(mode="after")
    def _check(self) -> PriceBook:
        seen: set[tuple[str, str, str]] = set()
        problems = []
        for i, r in enumerate(self.rates):
            k = (r.resource.value, r.sku, r.region)
            if k in seen:
                problems.append(f"rates.{i}: duplicate rate for resource={k[0]} sku={k[1]} region={k[2]}")
            seen.add(k)
        for resource, sku in ((Resource.CPU, "cpu"), (Resource.MEMORY, "gib")):
            if (resource.value, sku, ANY_REGION) not in seen:
                problems.append(f"rates: a region '*' rate for resource={resource.value} sku={sku} is required")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def rate(self, resource: Resource | str, sku: str, region: str) -> Rate:
        resource = Resource(resource)
        exact = fallback = None
        for r in self.rates:
            if r.resource == resource and r.sku.lower() == sku.lower():
                if r.region == region:
                    exact = r
                elif r.region == ANY_REGION:
                    fallback = r
        found = exact or fallback
        if found is None:
            raise PriceNotFound(resource.value, sku, region, self.version)
        return found


def parse_price_book(data: dict, *, source: str = "<price book>") -> PriceBook:
    return parse_config(PriceBook, data, source=source)


def load_price_book(path: str | Path | None = None, *, home=None) -> PriceBook:
    """The price book at ``path``; else ``<home>/pricebook.yaml`` if present; else the packaged default."""
    if path is None and home is not None:
        candidate = Path(home.root) / "pricebook.yaml"
        if candidate.is_file():
            path = candidate
    path = Path(path) if path is not None else DEFAULT_PATH
    return parse_price_book(read_yaml(path), source=str(path))
