"""Pricing is pure: ``price(usage_record, price_book) -> Cost``; no Ray, no I/O, no clock.

``book`` is one :class:`PriceBook` (it prices everything) or a :class:`PriceSchedule` (the record is priced by
the book in force at its ``window_start``).
"""

from __future__ import annotations

from dataclasses import dataclass

from aifactory.cost.pricebook import PriceBook
from aifactory.cost.records import UsageRecord
from aifactory.cost.schedule import PriceSchedule

Prices = PriceBook | PriceSchedule


@dataclass(frozen=True)
class Cost:
    usd: float
    usd_per_hour: float
    price_book_version: str


def price(record: UsageRecord, book: Prices) -> Cost:
    """The cost of one usage record under ``book`` (raises PriceNotFound when the book lacks the SKU, and
    NoPriceBookInForce when a schedule has no book at the record's time)."""
    if isinstance(book, PriceSchedule):
        book = book.at(record.window_start)
    usd_per_hour = book.usd_per_hour(record.resource, record.sku, record.region,
                                     pricing_class=record.pricing_class, pool=record.pool)
    return Cost(usd=record.quantity_s / 3600.0 * usd_per_hour, usd_per_hour=usd_per_hour,
                price_book_version=book.version)


def price_many(records, book: Prices) -> float:
    """Total USD of ``records``."""
    return sum(price(r, book).usd for r in records)
