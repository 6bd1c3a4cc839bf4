"""The copilot's request log: per tenant per UTC day, no raw secret ever written, purged past its retention, and
readable only by its own tenant (no Ray)."""

from __future__ import annotations

import datetime as dt

import pytest
from aifactory.exceptions import ConfigError, PermissionDenied
from aifactory.retrieval.requestlog import RequestLog, RequestLogConfig, RequestRecord

KEY = "aifk_0123456789abcdef_" + "Z" * 43
DAY0 = dt.datetime(2026, 12, 1, 23, 59, tzinfo=dt.UTC).timestamp()


def record(tenant="search", ts_s=DAY0, **kw) -> RequestRecord:
    fields = {"request_id": "r1", "tenant": tenant, "ts_s": ts_s, "status": "ok", "http_status": 200,
              "stage_ms": {"retrieve": 3.5, "generate": 120.0}, "prompt_tokens": 300, "completion_tokens": 40,
              "moderation": "allow", "cited_sources": ["/corpus/db/sqlite.py"]}
    return RequestRecord(**{**fields, **kw})


def test_records_go_to_the_tenants_file_of_the_day_and_read_back(tmp_path):
    log = RequestLog(tmp_path)
    path = log.append(record(question="how do I commit?", answer="call commit() [1]"))
    log.append(record(request_id="r2", ts_s=DAY0 + 120))  # 00:01 the next UTC day
    assert path == tmp_path / "search" / "2026-12-01.jsonl"
    assert sorted(p.name for p in (tmp_path / "search").iterdir()) == ["2026-12-01.jsonl", "2026-12-02.jsonl"]
    (first,) = log.read("search", caller="search", day="2026-12-01")
    assert first.stage_ms == {"retrieve": 3.5, "generate": 120.0} and first.question == "how do I commit?"
    assert [r.request_id for r in log.read("search", caller="search")] == ["r1", "r2"]


def test_no_raw_secret_or_pii_is_ever_written(tmp_path):
    log = RequestLog(tmp_path)
    path = log.append(record(question=f"my key {KEY} and card 4111 1111 1111 1111", answer="mail ops@example.com",
                             error=f"failed on {KEY}", status="error", http_status=502, moderation="refuse",
                             moderation_reasons=["secret: factory_key in the input"]))
    raw = path.read_text()
    for secret in (KEY, "4111 1111 1111 1111", "ops@example.com"):
        assert secret not in raw
    (r,) = log.read("search", caller="search")
    assert r.question == "my key [REDACTED:factory_key] and card [REDACTED:credit_card]"
    assert r.answer == "mail [REDACTED:email]" and r.error == "failed on [REDACTED:factory_key]"
    quiet = RequestLog(tmp_path / "quiet", RequestLogConfig(store_text=False))
    quiet.append(record(question="anything", answer="at all"))
    (q,) = quiet.read("search", caller="search")
    assert (q.question, q.answer, q.prompt_tokens) == (None, None, 300)


def test_purge_deletes_only_days_wholly_past_retention(tmp_path):
    log = RequestLog(tmp_path, RequestLogConfig(retention_days=7))
    for days_ago in (0, 6, 7, 8):
        log.append(record(ts_s=DAY0 - days_ago * 86400, tenant="search"))
    log.append(record(ts_s=DAY0 - 8 * 86400, tenant="ads"))
    # 2026-11-24's last record is 7 days old at 2026-12-02 00:00: its file goes then, not a second before
    week_after_1124 = dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp()
    deleted = log.purge(now=week_after_1124 - 1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in deleted) == ["ads/2026-11-23.jsonl",
                                                                           "search/2026-11-23.jsonl"]
    assert [p.name for p in log.purge(now=week_after_1124)] == ["2026-11-24.jsonl"]
    left = sorted(p.name for p in (tmp_path / "search").iterdir())
    assert left == ["2026-11-25.jsonl", "2026-12-01.jsonl"]


def test_a_tenant_reads_only_its_own_log(tmp_path):
    log = RequestLog(tmp_path)
    log.append(record(tenant="search", question="search's question"))
    log.append(record(tenant="ads", request_id="a1"))
    assert [r.request_id for r in log.read("ads", caller="ads")] == ["a1"]
    with pytest.raises(PermissionDenied, match="tenant 'ads' may read only its own request log"):
        log.read("search", caller="ads")
    with pytest.raises(ConfigError, match="tenant: "):
        log.read("../search", caller="../search")
    with pytest.raises(ValueError, match="tenant"):
        record(tenant="../etc")
