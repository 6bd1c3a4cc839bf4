"""Per-tenant cost accounting: metering, attribution, price book, pricing, ledger, budgets and exports.

Collection (from Ray) and pricing (from the price book) never mix: the collector writes usage records
(resource-seconds) to the ledger; :func:`aifactory.cost.pricing.price` turns one record into dollars.
Importing this package is light: Ray, prometheus_client and matplotlib load only where used.
"""

from aifactory.cost.pricebook import PriceBook, load_price_book
from aifactory.cost.pricing import Cost, price
from aifactory.cost.records import UsageRecord

__all__ = ["Cost", "PriceBook", "UsageRecord", "load_price_book", "price"]
