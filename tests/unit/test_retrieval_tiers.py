"""Freshness tiers: a fixed snapshot, and a fresh tier whose upserts replace older chunks, expire by TTL, survive a
restart through their log, and report their lag against the SLA (no Ray)."""

from __future__ import annotations

import pytest
import yaml
from aifactory.config import parse_config
from aifactory.exceptions import ConfigError, EmbeddingModelMismatch, PermissionDenied
from aifactory.home import FactoryHome
from aifactory.retrieval.index import build_index, load_index
from aifactory.retrieval.tiers import (
    LOG_FILE,
    FreshTier,
    TierConfig,
    freshness_alert_rule,
    open_tier,
)

from tests.unit._retrieval import HASH_MODEL, OTHER_MODEL, encode, publish_embeddings

DOCS = {
    "net/http.py": ["the http client sends a request and reads the response status"],
    "db/sqlite.py": ["a sqlite connection commits a transaction to the database file"],
    "math/stats.py": ["the median and the mean of a list of numbers"],
}


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def base(tmp_path):
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    built = build_index(home, model=HASH_MODEL, embedding_version=publish_embeddings(home, DOCS, tenant="search"))
    return load_index(home, built.version, tenant="search", model=HASH_MODEL)


def fresh(base, state_dir, clock, **cfg) -> FreshTier:
    config = TierConfig(kind="fresh", index_version=base.version, **cfg)
    return open_tier(base, config, tenant="search", state_dir=state_dir, clock=clock)


def upsert(tier, doc_id, texts):
    tier.upsert(doc_id, texts, encode(texts), model=HASH_MODEL)


def q(text):
    return encode([text])[0]


def test_an_upsert_replaces_the_documents_older_chunks_in_base_and_fresh(base, tmp_path):
    clock = Clock()
    tier = fresh(base, tmp_path / "tier", clock)
    top = tier.search(q("sqlite transaction database"), 1)[0]
    assert (top.chunk.doc_id, top.origin, top.fresh) == ("db/sqlite.py", "base", False)
    upsert(tier, "db/sqlite.py", ["postgres replaces the old storage engine"])
    clock.t += 1
    assert tier.lag_s() == 0.0  # apply_interval_s 0: searchable before upsert returned
    hits = tier.search(q("sqlite transaction database"), 3)
    assert all(h.chunk.text != DOCS["db/sqlite.py"][0] for h in hits)  # the base chunk is gone
    (new,) = [h for h in hits if h.chunk.doc_id == "db/sqlite.py"]
    assert new.origin == "fresh" and new.fresh and not new.expired
    assert new.chunk.source == base.chunks[[c.doc_id for c in base.chunks].index("db/sqlite.py")].source
    upsert(tier, "db/sqlite.py", ["mysql now", "and a second passage about replication"])
    texts = [h.chunk.text for h in tier.search(q("postgres storage engine mysql replication"), 5)]
    assert "postgres replaces the old storage engine" not in texts
    assert {"mysql now", "and a second passage about replication"} <= set(texts)
    assert len(texts) == 4  # 2 base docs + 2 fresh chunks, no duplicates
    snap = open_tier(base, TierConfig(kind="snapshot", index_version=base.version), tenant="search")
    assert snap.search(q("sqlite transaction database"), 1)[0].chunk.text == DOCS["db/sqlite.py"][0]


@pytest.mark.parametrize("policy", ["drop", "flag"])
def test_an_entry_past_its_ttl_is_never_returned_as_fresh(base, tmp_path, policy):
    clock = Clock()
    tier = fresh(base, tmp_path / "tier", clock, ttl_s=60, expired_policy=policy)
    upsert(tier, "new/doc.py", ["kubernetes operators reconcile custom resources"])
    clock.t += 59.9
    (hit,) = [h for h in tier.search(q("kubernetes operators"), 4) if h.origin == "fresh"]
    assert hit.fresh and not hit.expired and hit.expires_s == hit.ingest_s + 60
    clock.t += 0.1  # exactly at the TTL: no longer fresh
    late = [h for h in tier.search(q("kubernetes operators"), 4) if h.chunk.doc_id == "new/doc.py"]
    if policy == "drop":
        assert late == []
        upsert(tier, "new/live.py", ["kubernetes operators scale pods"])
        # the expired entry, nearer the query, must not crowd the live one out of the top 1
        assert tier.search(q("kubernetes operators reconcile custom resources"), 1)[0].chunk.doc_id == "new/live.py"
    else:
        assert [(h.fresh, h.expired) for h in late] == [(False, True)]


def test_a_restarted_replica_rebuilds_the_tier_from_its_log(base, tmp_path):
    clock = Clock()
    tier = fresh(base, tmp_path / "tier", clock, ttl_s=100)
    upsert(tier, "new/a.py", ["kafka topics hold partitioned logs"])
    clock.t += 50
    upsert(tier, "new/a.py", ["kafka consumers commit offsets"])
    upsert(tier, "net/http.py", ["grpc streams replace the http client"])
    with open(tmp_path / "tier" / LOG_FILE, "ab") as f:
        f.write(b'{"tenant":"search","doc_id":"torn')  # a crash mid-append: never acknowledged
    clock.t += 60
    again = fresh(base, tmp_path / "tier", clock, ttl_s=100)
    got = {h.chunk.text: h for h in again.search(q("kafka grpc http client offsets"), 4)}
    assert "kafka consumers commit offsets" in got and "kafka topics hold partitioned logs" not in got
    assert "grpc streams replace the http client" in got and DOCS["net/http.py"][0] not in got
    kept = got["kafka consumers commit offsets"]  # its TTL still counts from the original ingest
    assert (kept.ingest_s, kept.expires_s, kept.fresh) == (1_000_050.0, 1_000_150.0, True)
    upsert(again, "new/b.py", ["redis caches keys"])  # the torn tail was cut: this line parses on the next start
    third = fresh(base, tmp_path / "tier", clock)
    assert third.search(q("redis caches keys"), 1)[0].chunk.doc_id == "new/b.py"
    with pytest.raises(PermissionDenied, match="belongs to tenant 'search', not 'ads'"):
        FreshTier.open(base, TierConfig(kind="fresh"), state_dir=tmp_path / "tier", tenant="ads")
    log = tmp_path / "tier" / LOG_FILE
    log.write_text(log.read_text().replace('"tenant":"search"', '"tenant":"ads"', 1))
    with pytest.raises(PermissionDenied, match="the log holds tenant 'ads'"):
        fresh(base, tmp_path / "tier", clock)


def test_batched_applies_report_their_lag_against_the_sla(base, tmp_path):
    clock = Clock()
    tier = fresh(base, tmp_path / "tier", clock, sla_s=10, apply_interval_s=4)
    assert tier.gauges() == {"freshness_lag_s": 0.0, "freshness_sla_s": 10.0}
    upsert(tier, "new/doc.py", ["terraform plans infrastructure changes"])
    clock.t += 3
    assert tier.freshness_lag_s == 3.0
    assert all(h.chunk.doc_id != "new/doc.py" for h in tier.search(q("terraform plans"), 4))  # not yet applied
    clock.t += 1
    assert tier.search(q("terraform plans"), 1)[0].chunk.doc_id == "new/doc.py"  # due: applied by the read
    assert tier.lag_s() == 0.0
    with pytest.raises(ConfigError, match="apply_interval_s: 10s would break the freshness SLA"):
        parse_config(TierConfig, {"kind": "fresh", "sla_s": 10, "apply_interval_s": 10}, source="tier")
    with pytest.raises(ConfigError, match="index_version: a 'snapshot' tier names its index version"):
        parse_config(TierConfig, {"kind": "snapshot"}, source="tier")


def test_bad_upserts_and_queries_name_the_field(base, tmp_path):
    tier = fresh(base, tmp_path / "tier", Clock())
    with pytest.raises(EmbeddingModelMismatch, match="upsert of 'x.py'"):
        tier.upsert("x.py", ["text"], encode(["text"]), model=OTHER_MODEL)
    with pytest.raises(ConfigError, match=r"doc_id: .*\n.*vectors: one row of 384") as err:
        tier.upsert("", ["a", "b"], encode(["a"]), model=HASH_MODEL)
    assert len(err.value.problems) == 2
    with pytest.raises(ValueError, match="vector: a query vector has 384"):
        tier.search([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="k: "):
        tier.search(q("x"), 0)
    assert not (tmp_path / "tier" / LOG_FILE).exists()  # nothing refused was logged


def test_the_alert_rule_fires_over_twice_the_sla():
    rule = freshness_alert_rule(7.5)
    assert rule["expr"] == "max by (tenant) (aifactory_retrieval_freshness_lag_seconds) > 15"
    doc = yaml.safe_load(yaml.safe_dump({"groups": [{"name": "retrieval", "rules": [rule]}]}))
    (loaded,) = doc["groups"][0]["rules"]
    assert loaded == rule and loaded["alert"] and loaded["for"] == "60s"
    with pytest.raises(ValueError, match="sla_s"):
        freshness_alert_rule(0)
