"""The audit log's anchor (truncation and deletion are detected) and its intent/outcome/denial entries."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from aifactory import audit
from aifactory.exceptions import ConfigError, IntegrityError, QuotaExceeded
from aifactory.home import FactoryHome


@pytest.fixture
def home(tmp_path, monkeypatch) -> FactoryHome:
    monkeypatch.delenv("AIFACTORY_AUDIT_ANCHOR", raising=False)
    return FactoryHome.from_env(tmp_path / "home").ensure()


def _record(home, n):
    for i in range(n):
        audit.record(home, actor="ops", action="budget.set", target=f"t{i}", tenant="search", detail={"i": i})


def _truncate(home, keep: int):
    """What someone with write access to the file does: cut the tail, and cover it up in sqlite_sequence."""
    db = sqlite3.connect(audit.audit_path(home), isolation_level=None)
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
    db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit_log'", (keep,))
    db.close()


# ---- the anchor ---------------------------------------------------------------------------------------

def test_truncated_tail_is_detected_by_the_anchor(home):
    _record(home, 5)
    _truncate(home, 3)
    with pytest.raises(IntegrityError, match="truncated: anchor says 5 rows, found 3"):
        audit.verify(home)
    # and the log is not extended: new rows would hide the cut
    with pytest.raises(IntegrityError, match="truncated"):
        audit.record(home, actor="ops", action="job.stop", target="j")
    assert len(audit.query(home)) == 3


def test_deleted_log_is_detected_and_not_restarted(home):
    _record(home, 3)
    audit.audit_path(home).unlink()
    with pytest.raises(IntegrityError, match="audit log missing but anchor exists"):
        audit.verify(home)
    with pytest.raises(IntegrityError, match="audit log missing but anchor exists"):
        audit.record(home, actor="ops", action="job.stop", target="j")
    assert not audit.audit_path(home).exists()


def test_anchor_elsewhere_survives_the_loss_of_the_home(home, tmp_path, monkeypatch):
    anchor = tmp_path / "other-disk" / "audit.anchor"
    monkeypatch.setenv("AIFACTORY_AUDIT_ANCHOR", str(anchor))
    _record(home, 2)
    assert audit.anchor_path(home) == anchor and anchor.is_file()
    assert not (home.root / "security" / "audit_anchor").exists()
    shutil.rmtree(home.root)  # the log and the chain key with it
    with pytest.raises(IntegrityError, match="audit log missing but anchor exists"):
        audit.verify(FactoryHome.from_env(home.root))


def test_anchor_rewritten_without_the_key_is_detected(home):
    _record(home, 4)
    _truncate(home, 2)
    last = audit.query(home)[-1]
    audit.anchor_path(home).write_text(json.dumps({"seq": 2, "hash": last.hash, "mac": "0" * 64}))
    with pytest.raises(IntegrityError, match="bad MAC"):
        audit.verify(home)


def test_anchor_one_entry_behind_after_a_crash_is_accepted(home, monkeypatch):
    _record(home, 2)
    real = audit._write_anchor

    def crash(*args, **kwargs):
        raise OSError("killed between the commit and the anchor update")

    monkeypatch.setattr(audit, "_write_anchor", crash)
    with pytest.raises(OSError):
        _record(home, 1)
    monkeypatch.setattr(audit, "_write_anchor", real)
    assert audit.verify(home) == 3  # committed; the anchor still says 2
    _record(home, 1)
    assert json.loads(audit.anchor_path(home).read_text())["seq"] == 4


# ---- intent, outcome, denial ---------------------------------------------------------------------------

def _chained(entries):
    return entries[0].prev_hash == audit.GENESIS and all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))


def test_action_records_intent_before_and_outcome_after(home):
    with audit.action(home, actor="ops", action="job.submit", target="new", tenant="search",
                      detail={"entrypoint": "python x.py"}) as act:
        (intent,) = audit.query(home)  # the intent is on disk before the action runs
        assert intent.detail == {"entrypoint": "python x.py", "phase": "intent"}
        act.target = "raysubmit_1"
        act.detail["resources"] = {"CPU": 1}
    intent, done = audit.query(home)
    assert (done.action, done.actor, done.tenant, done.target) == ("job.submit", "ops", "search", "raysubmit_1")
    assert done.detail == {"phase": "outcome", "intent_seq": intent.seq, "outcome": "ok", "resources": {"CPU": 1}}
    assert _chained([intent, done]) and audit.verify(home) == 2
    assert audit.open_intents(home) == []


def test_failed_and_refused_actions_record_why_and_reraise(home):
    with pytest.raises(RuntimeError, match="boom"):
        with audit.action(home, actor="ops", action="serve.deploy", target="app", tenant="search"):
            raise RuntimeError("boom")
    with pytest.raises(QuotaExceeded):
        with audit.action(home, actor="ops", action="job.submit", target="new", tenant="search"):
            raise QuotaExceeded("search", "GPU", 8, 4)
    outcomes = [e.detail for e in audit.query(home) if e.detail["phase"] == "outcome"]
    assert [(d["outcome"], d["error"].split(":")[0]) for d in outcomes] == [
        ("failed", "RuntimeError"), ("denied", "QuotaExceeded")]
    assert outcomes[0]["error"] == "RuntimeError: boom"
    assert audit.verify(home) == 4


def test_denied_records_a_refusal_in_the_chain(home):
    _record(home, 1)
    e = audit.denied(home, actor="apikey:ab12", action="job.submit", target="-", tenant="search",
                     reason="BudgetExceeded(tenant='search')", detail={"resources": {"GPU": 2}})
    assert e.detail == {"phase": "denied", "outcome": "denied", "error": "BudgetExceeded(tenant='search')",
                        "resources": {"GPU": 2}}
    assert [x.seq for x in audit.query(home, action="job.submit", tenant="search")] == [2]
    assert _chained(audit.query(home)) and audit.verify(home) == 2


def test_intent_and_outcome_apart_and_their_validation(home):
    i = audit.intent(home, actor="ops", action="key.rotate", target="k1", tenant="ads")
    assert [e.seq for e in audit.open_intents(home)] == [i.seq]  # a crash here leaves this trace
    audit.outcome(home, i.seq, "ok")
    assert audit.open_intents(home) == []
    with pytest.raises(ConfigError, match="no intent entry with seq 99"):
        audit.outcome(home, 99, "ok")
    with pytest.raises(ConfigError, match="result"):
        audit.outcome(home, i.seq, "maybe")
    with pytest.raises(ConfigError, match="detail.phase: reserved"):
        audit.record(home, actor="ops", action="job.stop", target="j", detail={"phase": "intent"})
