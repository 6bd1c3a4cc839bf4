"""Price maths and price-book validation: pure, no cluster."""

import pytest

from aifactory.cost.pricebook import DEFAULT_PATH, PriceNotFound, load_price_book, parse_price_book
from aifactory.cost.pricing import price, price_many
from aifactory.cost.records import UsageRecord
from aifactory.exceptions import ConfigError


def rec(**kw):
    base = dict(window_start=0.0, window_end=60.0, tenant="a", resource="cpu", sku="cpu", quantity_s=3600.0)
    base.update(kw)
    return UsageRecord(**base)


BOOK = {
    "version": "t1",
    "rates": [
        {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 0.10, "reserved_usd_per_hour": 0.06},
        {"resource": "cpu", "sku": "cpu", "region": "eu", "on_demand_usd_per_hour": 0.12},
        {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.01},
        {"resource": "gpu", "sku": "H100", "on_demand_usd_per_hour": 4.0, "reserved_usd_per_hour": 2.5},
    ],
}


def test_cpu_hour_on_demand_and_reserved():
    book = parse_price_book(BOOK)
    assert price(rec(), book).usd == pytest.approx(0.10)
    assert price(rec(pricing_class="reserved"), book).usd == pytest.approx(0.06)
    assert price(rec(quantity_s=1800), book).usd == pytest.approx(0.05)
    assert price(rec(), book).price_book_version == "t1"


def test_region_override_and_fallback():
    book = parse_price_book(BOOK)
    assert price(rec(region="eu"), book).usd == pytest.approx(0.12)
    # no reserved rate in eu: the on-demand one applies
    assert price(rec(region="eu", pricing_class="reserved"), book).usd == pytest.approx(0.12)
    assert price(rec(region="us"), book).usd == pytest.approx(0.10)


def test_gpu_by_accelerator_type_and_missing_sku_fails_loudly():
    book = parse_price_book(BOOK)
    assert price(rec(resource="gpu", sku="H100", quantity_s=7200), book).usd == pytest.approx(8.0)
    assert price(rec(resource="gpu", sku="h100", quantity_s=3600), book).usd == pytest.approx(4.0)
    with pytest.raises(PriceNotFound, match="sku='L4'"):
        price(rec(resource="gpu", sku="L4"), book)


def test_price_many_is_additive():
    book = parse_price_book(BOOK)
    records = [rec(quantity_s=900), rec(quantity_s=2700), rec(resource="memory", sku="gib", quantity_s=36000)]
    assert price_many(records, book) == pytest.approx(0.10 + 0.10)


def test_default_book_ships_h100_h200_l4_and_an_asic():
    book = load_price_book(DEFAULT_PATH)
    for sku in ("H100", "H200", "L4"):
        assert book.rate("gpu", sku, "local").on_demand_usd_per_hour > 0
    assert book.rate("asic", "TPU-V5E", "local").reserved_usd_per_hour > 0
    assert book.rate("gpu", "H200", "local").on_demand_usd_per_hour > book.rate("gpu", "L4", "local").on_demand_usd_per_hour


def test_book_validation_reports_every_problem():
    bad = {
        "version": "x",
        "rates": [
            {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": -1},
            {"resource": "tpu", "sku": "v5", "on_demand_usd_per_hour": 1},
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_price_book(bad)
    text = str(err.value)
    assert "rates.0.on_demand_usd_per_hour" in text and "rates.1.resource" in text


def test_book_rejects_duplicates_and_missing_base_rates():
    dup = {"version": "x", "rates": [BOOK["rates"][0], BOOK["rates"][0], BOOK["rates"][2]]}
    with pytest.raises(ConfigError, match="duplicate rate"):
        parse_price_book(dup)
    with pytest.raises(ConfigError, match="resource=memory"):
        parse_price_book({"version": "x", "rates": [BOOK["rates"][0]]})


def test_usage_record_key_is_deterministic_and_validates_window():
    assert rec().key == rec().key
    assert rec().key != rec(tenant="b").key
    with pytest.raises(ValueError, match="window_end"):
        rec(window_end=0.0)
    with pytest.raises(ValueError):
        rec(quantity_s=-1)
