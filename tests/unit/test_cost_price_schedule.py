"""Price books with effective dates: usage is priced by the book in force when it happened (pure, no cluster)."""

import datetime as dt
import subprocess
import sys

import pytest
import yaml

from aifactory.cost.kpis import cost_rows, reprice_rows
from aifactory.cost.pricebook import parse_price_book
from aifactory.cost.pricing import price
from aifactory.cost.records import UsageRecord
from aifactory.cost.schedule import NoPriceBookInForce, PriceSchedule, add_price_book, load_prices
from aifactory.exceptions import ConfigError
from aifactory.home import FactoryHome

T_CHANGE = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc).timestamp()


def book(version, cpu_usd, effective_from=None):
    data = {"version": version, "rates": [
        {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": cpu_usd},
        {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.01}]}
    if effective_from is not None:
        data["effective_from"] = effective_from
    return parse_price_book(data)


def rec(t, **kw):
    return UsageRecord(window_start=t, window_end=t + 60, tenant="a", resource="cpu", sku="cpu", quantity_s=3600.0,
                       **kw)


def test_a_new_book_leaves_earlier_usage_unchanged():
    before, after = rec(T_CHANGE - 3600), rec(T_CHANGE + 3600)
    old = PriceSchedule.of([book("v1", 0.10)])
    new = old.with_book(book("v2", 0.30, "2026-06-01"))
    assert price(before, old).usd == pytest.approx(0.10)
    assert price(before, new).usd == pytest.approx(0.10)  # unchanged by the new book
    assert price(after, new).usd == pytest.approx(0.30)
    assert price(after, new).price_book_version == "v2"
    assert price(before, new).price_book_version == "v1"


def test_undated_book_is_in_force_since_forever_and_a_dated_base_has_no_price_before_it():
    assert price(rec(0.0), PriceSchedule.of([book("v1", 0.1)])).usd == pytest.approx(0.1)
    dated = PriceSchedule.of([book("v1", 0.1, "2026-06-01")])
    with pytest.raises(NoPriceBookInForce, match="v1"):
        price(rec(T_CHANGE - 1), dated)


def test_date_means_midnight_utc_and_naive_times_are_utc():
    assert book("v", 0.1, "2026-06-01").effective_from_ts == T_CHANGE
    assert book("v", 0.1, "2026-06-01T00:00:00").effective_from_ts == T_CHANGE


def test_schedule_refuses_duplicate_versions_and_dates_naming_both():
    with pytest.raises(ConfigError, match="version 'v1'"):
        PriceSchedule.of([book("v1", 0.1), book("v1", 0.2, "2026-06-01")])
    with pytest.raises(ConfigError, match="effective_from"):
        PriceSchedule.of([book("v1", 0.1), book("v2", 0.2)])


def test_what_if_reprices_history_without_changing_the_books_in_force():
    records = [rec(T_CHANGE - 3600), rec(T_CHANGE + 3600)]
    books = PriceSchedule.of([book("v1", 0.10)]).with_book(book("v2", 0.30, "2026-06-01"))
    what_if = books.with_book(book("flat", 0.20))  # undated: prices everything
    (row,) = reprice_rows(records, books, what_if)
    assert row["cost_usd"] == pytest.approx(0.40)
    assert row["what_if_usd"] == pytest.approx(0.40)
    assert row["delta_usd"] == pytest.approx(0.0)
    cheaper = books.with_book(book("v3", 0.05, "2026-06-01"))  # replaces v2's date
    (row,) = reprice_rows(records, books, cheaper)
    assert row["what_if_usd"] == pytest.approx(0.15)
    assert cost_rows(records, books)[0]["cost_usd"] == pytest.approx(0.40)


def test_add_price_book_takes_effect_now_and_refuses_the_past(tmp_path):
    home = FactoryHome.from_env(tmp_path)
    now = T_CHANGE
    with pytest.raises(ConfigError, match="effective_from.*past"):
        add_price_book(home, book("v2", 0.3, "2026-05-01"), now=now)
    path = add_price_book(home, book("v2", 0.3), now=now)
    assert path.parent == tmp_path / "pricebooks"
    prices = load_prices(home=home)
    assert [b.version for b in prices.books][-1] == "v2"
    base_version = prices.books[0].version
    assert price(rec(now - 60), prices).price_book_version == base_version
    assert price(rec(now + 60), prices).usd == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="already in the schedule"):
        add_price_book(home, book("v2", 0.4), now=now + 10)


def test_undated_book_under_pricebooks_is_refused_naming_the_file(tmp_path):
    (tmp_path / "pricebooks").mkdir()
    (tmp_path / "pricebooks" / "x.yaml").write_text(yaml.safe_dump(book("v9", 0.1).model_dump(mode="json")))
    with pytest.raises(ConfigError, match=r"x\.yaml: effective_from"):
        load_prices(home=FactoryHome.from_env(tmp_path))


def test_cli_pricebook_add_list_and_reprice_with(tmp_path):
    from aifactory.cost.ledger import Ledger

    env_home = tmp_path / "home"
    home = FactoryHome.from_env(env_home)
    Ledger.of(home).append([rec(1_000.0)])
    f = tmp_path / "flat.yaml"
    f.write_text(yaml.safe_dump({"version": "flat", "rates": [
        {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 1.0},
        {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.01}]}))

    def factory(*argv):
        return subprocess.run([sys.executable, "-m", "aifactory.cli", *argv], check=False, capture_output=True, text=True,
                              env={"AIFACTORY_HOME": str(env_home), "PATH": "/usr/bin:/bin"}, timeout=60)

    out = factory("costs", "--reprice-with", str(f), "--format", "json")
    assert out.returncode == 0, out.stderr
    (row,) = yaml.safe_load(out.stdout)
    assert row["what_if_usd"] == pytest.approx(1.0)
    assert row["cost_usd"] == pytest.approx(0.048)  # the packaged default's on-demand CPU-hour
    added = factory("costs", "pricebook", "add", str(f))
    assert added.returncode == 0, added.stderr
    listed = factory("costs", "pricebook", "list", "--format", "json")
    assert [r["version"] for r in yaml.safe_load(listed.stdout)][-1] == "flat"
    after = factory("costs", "--format", "json")
    assert yaml.safe_load(after.stdout)[0]["cost_usd"] == pytest.approx(0.048)  # earlier usage unchanged
