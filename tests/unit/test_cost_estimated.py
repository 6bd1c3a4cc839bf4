"""Usage the meter estimated (no GCS actor times) carries an ``estimated`` flag: attribution, a real SQLite
ledger (and the migration of one written before the flag), the cost rows and what `factory costs` prints."""

import json
import sqlite3
import subprocess
import sys

from aifactory.cli.main import main
from aifactory.cost.attribution import CapacityPoint, Holding, Tracker, attribute
from aifactory.cost.kpis import cost_rows
from aifactory.cost.ledger import Ledger
from aifactory.cost.pricebook import parse_price_book
from aifactory.cost.records import UsageRecord
from aifactory.cost.report import mark_estimated, write_report

BOOK = parse_price_book({"version": "t", "rates": [
    {"resource": "cpu", "sku": "cpu", "on_demand_usd_per_hour": 3.6},  # 0.001 USD per CPU-second
    {"resource": "memory", "sku": "gib", "on_demand_usd_per_hour": 0.0},
]})
CPU = {("cpu", "cpu"): 1.0}


def _records():
    holdings = [Holding("actor:guessed", "alpha", CPU, start=0.0, estimated=True),
                Holding("job:exact", "beta", CPU, start=0.0)]
    return attribute(holdings, [CapacityPoint(0.0, {("cpu", "cpu"): 3.0})], 0.0, 60.0)


def test_estimated_holdings_give_estimated_records_and_nothing_else_does():
    recs = {r.tenant: r for r in _records()}
    assert recs["alpha"].estimated is True
    assert recs["beta"].estimated is False and recs["idle"].estimated is False
    # The flag does not change the idempotency key: a window rewritten after a fallback is still one record.
    assert recs["alpha"].key == recs["alpha"].model_copy(update={"estimated": False}).key


def test_the_tracker_keeps_the_flag_across_a_restart_and_reads_older_state():
    t = Tracker()
    t.observe(10.0, [Holding("actor:a", "alpha", CPU, estimated=True)])
    again = Tracker.from_json(json.loads(json.dumps(t.to_json())))
    assert again.open["actor:a"].estimated is True
    old = t.to_json()
    for h in old["open"]:
        del h["estimated"]  # state written by a collector from before the flag
    assert Tracker.from_json(old).open["actor:a"].estimated is False


def test_the_sampler_falls_back_to_estimates_without_gcs_actor_times():
    # In a fresh interpreter, which is no Ray driver (this pytest process may be one: the integration tests
    # share it), the GCS actor table cannot be read, and the sampler says so with None.
    code = "from aifactory.cost.sampler import actor_times; print(repr(actor_times()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "None"


def _old_ledger(path):
    """A ledger as the factory wrote it before the estimated column."""
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE usage (
        key TEXT PRIMARY KEY, window_start REAL NOT NULL, window_end REAL NOT NULL,
        tenant TEXT NOT NULL, project TEXT NOT NULL, workload TEXT NOT NULL,
        job_id TEXT NOT NULL, deployment TEXT NOT NULL, holder TEXT NOT NULL,
        resource TEXT NOT NULL, sku TEXT NOT NULL, region TEXT NOT NULL, pricing_class TEXT NOT NULL,
        quantity_s REAL NOT NULL, used_s REAL, written_at REAL NOT NULL,
        pool TEXT NOT NULL DEFAULT 'default', gpu_memory_gib_s REAL, energy_j REAL)""")
    db.execute("INSERT INTO usage VALUES ('old',0,60,'gamma','default','other','','','h','cpu','cpu','local',"
               "'on-demand',60,NULL,0,'default',NULL,NULL)")
    db.commit()
    db.close()


def test_an_older_ledger_gains_the_column_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_ledger(path)
    led = Ledger(path)
    cols = {row[1]: row for row in sqlite3.connect(path).execute("PRAGMA table_info(usage)")}
    assert "estimated" in cols and cols["estimated"][3] == 1  # NOT NULL, default 0
    (old,) = led.usage()
    assert old.tenant == "gamma" and old.estimated is False and old.quantity_s == 60.0
    assert led.append(_records()) == 3
    got = {r.tenant: r.estimated for r in Ledger(path).usage()}  # reopened: migrated once, read back
    assert got == {"gamma": False, "alpha": True, "beta": False, "idle": False}


def test_cost_rows_and_the_report_mark_estimated_figures(tmp_path):
    rows = {r["tenant"]: r for r in cost_rows(_records(), BOOK, by="tenant")}
    assert rows["alpha"]["estimated"] is True and rows["alpha"]["estimated_usd"] == rows["alpha"]["cost_usd"] == 0.06
    assert rows["beta"]["estimated"] is False and rows["beta"]["estimated_usd"] == 0.0
    shown = {r["tenant"]: r for r in mark_estimated(list(rows.values()))}
    assert shown["alpha"]["cost_usd"] == "~0.06" and shown["beta"]["cost_usd"] == 0.06
    plain = mark_estimated(cost_rows([r.model_copy(update={"estimated": False}) for r in _records()], BOOK))
    assert all("estimated" not in r and "estimated_usd" not in r for r in plain)
    led = Ledger(tmp_path / "l.sqlite")
    led.append(_records())
    page = write_report(tmp_path / "report", ledger=led, book=BOOK).read_text()
    assert "~0.06" in page and "estimated:" in page


def test_factory_costs_shows_the_flag(tmp_path, capsys):
    ledger = tmp_path / "l.sqlite"
    Ledger(ledger).append(_records())
    book = tmp_path / "book.yaml"
    book.write_text("version: t\nrates:\n- {resource: cpu, sku: cpu, on_demand_usd_per_hour: 3.6}\n"
                    "- {resource: memory, sku: gib, on_demand_usd_per_hour: 0.0}\n")
    base = ["--home", str(tmp_path / "home"), "costs", "--ledger", str(ledger), "--pricebook", str(book)]
    assert main([*base, "--format", "json"]) == 0
    rows = {r["tenant"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alpha"]["estimated"] is True and rows["beta"]["estimated"] is False
    assert main(base) == 0
    out = capsys.readouterr().out
    alpha = next(line for line in out.splitlines() if line.startswith("alpha"))
    assert "~0.06" in alpha
    assert "~ estimated: 1 row(s) include $0.060000" in out


def test_a_record_says_estimated_only_when_told():
    r = UsageRecord(window_start=0, window_end=1, tenant="a", resource="cpu", sku="cpu", quantity_s=1)
    assert r.estimated is False
