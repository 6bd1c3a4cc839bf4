"""Pricing is pure: ``price(usage_record, price_book) -> Cost``; no Ray, no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass

from aifactory.cost.pricebook import PriceBook
from aifactory.cost.records import UsageRecord


@dataclass(frozen=True)
class Cost:
    usd: float
    usd_per_hour: float
    price_book_version: str


def price(record: UsageRecord, book: PriceBook) -> Cost:
    """The cost of one usage record under ``book`` (raises PriceNotFound when the book lacks the SKU)."""
    usd_per_hour = book.usd_per_hour(record.resource, record.sku, record.region,
                                     pricing_class=record.pricing_class, pool=record.pool)
    return Cost(usd=record.quantity_s / 3600.0 * usd_per_hour, usd_per_hour=usd_per_hour,
                price_book_version=book.version)


def price_many(records, book: PriceBook) -> float:
    """Total USD of ``records``."""
    return sum(price(r, book).usd for r in records)
