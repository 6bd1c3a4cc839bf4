"""The meter's reading of the front door's run records: workload kinds per launch, overruns, answered requests."""

from __future__ import annotations

import json
import sqlite3

from aifactory.cost.attribution import Holding, Tracker
from aifactory.cost.collector import _overrun_key, _overrun_message
from aifactory.cost.kpis import kpis
from aifactory.cost.ledger import Ledger
from aifactory.cost.pricebook import load_price_book
from aifactory.cost.records import SKU_CPU
from aifactory.cost.spans import Span, SpanReader, over_declared, retag, span_of

CPU = ("cpu", SKU_CPU)


def _record(kind, job, start, end=None, status="succeeded", within=None):
    return {"id": f"{kind}-1", "workload": {"kind": kind}, "ray_job_id": job, "status": status,
            "started_at": start, "finished_at": end, "within": within}


def test_a_holding_taken_during_a_launch_carries_that_launchs_kind():
    spans = [span_of(_record("ingest", "01", 100, 110)), span_of(_record("train", "01", 120, 200)),
             span_of(_record("bench", "01", 210, None, status="running"))]
    h = Holding("pg:a", "acme", {CPU: 2}, start=125, workload="other", job_id="01")
    assert retag(h, spans).workload == "train"
    assert retag(Holding("task:b", "acme", {CPU: 1}, start=215, job_id="01"), spans).workload == "bench"
    # Between launches, or another job's: the job's own tag.
    assert retag(Holding("task:c", "acme", {CPU: 1}, start=115, job_id="01"), spans).workload == "other"
    assert retag(Holding("task:d", "acme", {CPU: 1}, start=125, job_id="02"), spans).workload == "other"
    # A Serve replica is serve whatever its job did.
    rep = Holding("actor:r", "acme", {CPU: 1}, start=125, job_id="01", workload="serve", deployment="app/Model")
    assert retag(rep, spans).workload == "serve"


def test_detached_launches_and_trials_are_not_spans():
    assert span_of(_record("other", "01", 100, status="started")) is None  # a submitted job runs elsewhere
    assert span_of(_record("train", "01", 100, 110, within="bench-1")) is None  # its sweep declared it
    assert span_of(_record("train", None, 100, 110)) is None  # launched by no driver
    assert span_of({"garbage": True}) is None
    assert span_of(_record("train", "01", 100, 110)) == Span("01", "train", 100.0, 110.0)


def test_the_reader_sees_new_and_rewritten_records(tmp_path):
    d = tmp_path / "workloads"
    d.mkdir()
    reader = SpanReader(d)
    assert reader.spans() == []
    (d / "a.json").write_text(json.dumps(_record("train", "01", 100, None, status="running")))
    (d / "half.json").write_text("{not json")  # being replaced: skipped, not fatal
    assert reader.spans() == [Span("01", "train", 100.0, None)]
    import os
    p = d / "a.json"
    p.write_text(json.dumps(_record("train", "01", 100, 150)))
    os.utime(p, (1e9, 1e9))  # a different mtime, as a rewrite has
    assert reader.spans() == [Span("01", "train", 100.0, 150.0)]


def test_retagged_holdings_stay_retagged_through_the_tracker():
    """The tracker takes fresh metadata every sample; retagging by the resolved start is stable."""
    spans = [Span("01", "train", 100.0, 130.0)]
    tr = Tracker()
    for t in (110.0, 120.0, 140.0):  # still held after the launch ended
        tr.observe(t, [Holding("pg:a", "acme", {CPU: 2}, job_id="01")])
        for table in (tr.open, tr.closed):
            for k, h in table.items():
                table[k] = retag(h, spans)
    assert tr.open["pg:a"].workload == "train"


def test_jobs_holding_more_than_declared_are_flagged():
    hold = [Holding("job:s1", "acme", {CPU: 1}, start=1, job_id="01"),
            Holding("task:1", "acme", {CPU: 1}, start=1, job_id="01"),
            Holding("task:2", "acme", {CPU: 1}, start=1, job_id="01"),
            Holding("task:3", "beta", {CPU: 1}, start=1, job_id="02"),
            Holding("task:4", "gamma", {CPU: 5}, start=1, job_id="03")]  # declared nothing: not checked
    declared = {"01": {"cpu": 2.0, "gpu": 0.0}, "02": {"cpu": 1.0}}
    assert over_declared(hold, declared) == {"01": {"cpu": (3.0, 2.0)}}
    msg = _overrun_message("01", "cpu", 3.0, 2.0)
    assert _overrun_key(msg) == ("01", "cpu")
    assert _overrun_key("budget soft limit reached") is None


def test_cost_per_1k_requests_counts_answered_requests_only(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.commit_window("c", [], cursor=10.0, state={}, serve_rows=[
        {"key": "k1", "window_start": 0, "window_end": 10, "tenant": "acme", "application": "app",
         "requests": 1000, "processing_s": 5.0, "tokens": 0, "answered": 800, "rejected": 200}])
    rows = ledger.serve_usage()
    assert rows[0]["answered"] == 800 and rows[0]["rejected"] == 200
    from aifactory.cost.records import Resource, UsageRecord

    rec = UsageRecord(window_start=0, window_end=10, tenant="acme", project="default", workload="serve",
                      job_id="", deployment="app/Model", holder="actor:x", resource=Resource.CPU, sku=SKU_CPU,
                      region="local", pricing_class="on-demand", quantity_s=10.0)
    row = next(r for r in kpis([rec], load_price_book(), serve_usage=rows) if r["tenant"] == "acme")
    assert row["requests"] == 800 and row["rejected_requests"] == 200
    assert abs(row["cost_per_1k_requests_usd"] - row["cost_usd"] / 0.8) < 1e-6


def test_an_older_ledger_gains_the_answered_and_rejected_columns(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:  # the serve_usage table as it was before the split
        db.execute("CREATE TABLE serve_usage (key TEXT PRIMARY KEY, window_start REAL NOT NULL, window_end REAL "
                   "NOT NULL, tenant TEXT NOT NULL, project TEXT NOT NULL, application TEXT NOT NULL, requests REAL "
                   "NOT NULL, processing_s REAL NOT NULL, tokens REAL NOT NULL)")
        db.execute("INSERT INTO serve_usage VALUES ('old',0,10,'acme','default','app',50,1.0,0)")
    ledger = Ledger(path)
    (old,) = ledger.serve_usage()
    assert old["requests"] == 50 and old["answered"] is None
    row = next(r for r in kpis([], load_price_book(), serve_usage=[old]) if r["tenant"] == "acme")
    assert row["requests"] == 50  # an old row counts all its requests
