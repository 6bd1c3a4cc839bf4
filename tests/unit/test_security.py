"""API keys, artifact signing and the audit chain, without Ray."""

from __future__ import annotations

import json
import sqlite3
import stat
import time

import pytest

from aifactory import audit
from aifactory.exceptions import AuthenticationError, ConfigError, IntegrityError, NotFound
from aifactory.home import FactoryHome
from aifactory.security import signing
from aifactory.security.apikeys import KeyStore


@pytest.fixture
def home(tmp_path) -> FactoryHome:
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    signing.create_signing_key(home)  # as `factory up` does; signing never creates a key
    return home


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- API keys ---------------------------------------------------------------------------------------

def test_keys_are_stored_hashed_and_authenticate(home):
    store = KeyStore(home)
    issued = store.create(tenant="search", name="ci", actor="ops")
    assert issued.secret.startswith(f"aifk_{issued.info.key_id}_")
    p = store.authenticate(issued.secret)
    assert (p.tenant, p.role, p.is_admin, p.key_id) == ("search", "tenant", False, issued.info.key_id)
    assert _mode(store.path) == 0o600 and _mode(store.path.parent) == 0o700
    # the secret part is nowhere in the database file
    secret_part = issued.secret.split("_", 2)[2]
    assert len(secret_part) == 43 and secret_part.encode() not in store.path.read_bytes()


@pytest.mark.parametrize("bad", [None, "", "Bearer x", "aifk_0123456789abcdef_short",
                                 "aifk_0123456789abcdef_" + "A" * 43])
def test_bad_keys_are_refused(home, bad):
    store = KeyStore(home)
    store.create(tenant="search")
    with pytest.raises(AuthenticationError):
        store.authenticate(bad)


def test_wrong_secret_for_a_real_key_id_is_refused(home):
    store = KeyStore(home)
    issued = store.create(tenant="search")
    forged = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    with pytest.raises(AuthenticationError, match="invalid"):
        store.authenticate(forged)


def test_rotation_replaces_and_revocation_stops_a_key(home):
    store = KeyStore(home)
    old = store.create(tenant="ads", name="svc")
    new = store.rotate(old.info.key_id, actor="ops")
    assert new.info.tenant == "ads" and new.info.name == "svc" and new.info.key_id != old.info.key_id
    with pytest.raises(AuthenticationError, match="revoked or rotated"):
        store.authenticate(old.secret)
    assert store.authenticate(new.secret).tenant == "ads"
    assert store.get(old.info.key_id).rotated_to == new.info.key_id
    with pytest.raises(ConfigError, match="already revoked or rotated"):
        store.rotate(old.info.key_id)
    store.revoke(new.info.key_id, actor="ops")
    with pytest.raises(AuthenticationError):
        store.authenticate(new.secret)
    assert [k.active for k in store.list("ads")] == [False, False]


def test_rotation_with_grace_keeps_the_old_key_briefly(home):
    store = KeyStore(home)
    old = store.create(tenant="ads")
    new = store.rotate(old.info.key_id, grace_s=60)
    assert store.authenticate(old.secret).key_id == old.info.key_id
    assert store.authenticate(new.secret).key_id == new.info.key_id


def test_admin_keys_and_validation(home):
    store = KeyStore(home)
    admin = store.authenticate(store.create(tenant=None, role="admin").secret)
    assert admin.is_admin and admin.tenant is None and admin.can_see("anyone")
    with pytest.raises(ConfigError) as info:
        store.create(tenant="Bad Name!")
    assert "tenant:" in str(info.value)
    with pytest.raises(ConfigError, match="role"):
        store.create(tenant="x", role="root")
    with pytest.raises(ConfigError, match="admin key acts for every tenant"):
        store.create(tenant="x", role="admin")
    with pytest.raises(NotFound):
        store.revoke("0123456789abcdef")


def test_key_lifecycle_is_audited_once_each(home):
    store = KeyStore(home)
    k = store.create(tenant="search", actor="ops")
    r = store.rotate(k.info.key_id, actor="ops")
    store.revoke(r.info.key_id, actor="ops")
    store.revoke(r.info.key_id, actor="ops")  # no-op: not audited again
    actions = [(e.action, e.target) for e in audit.query(home)]
    assert actions == [("key.create", k.info.key_id), ("key.rotate", k.info.key_id), ("key.revoke", r.info.key_id)]


# ---- signing ----------------------------------------------------------------------------------------

def _model(tmp_path, home):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"\x00weights" * 100)
    fields = dict(name="tiny", version="v1", sha256=signing.sha256_file(weights),
                  model_config={"d_model": 8}, manifest={"tenant": "search", "metrics": {"loss": 1.5}})
    return weights, fields, signing.sign_model(home, **fields)


def test_signed_model_verifies_and_key_is_private(tmp_path, home):
    weights, fields, sig = _model(tmp_path, home)
    signing.verify_model(home, **fields, signature=sig, weights_path=weights)
    private = home.root / "security" / "signing_key.pem"
    assert _mode(private) == 0o600 and b"PRIVATE KEY" in private.read_bytes()
    assert sig["algorithm"] == "ed25519" and len(sig["key_id"]) == 16


def test_tampered_manifest_weights_or_signature_are_refused(tmp_path, home):
    weights, fields, sig = _model(tmp_path, home)
    tampered = dict(fields, manifest={**fields["manifest"], "tenant": "ads"})
    with pytest.raises(IntegrityError, match="bad signature"):
        signing.verify_model(home, **tampered, signature=sig, weights_path=weights)
    with pytest.raises(IntegrityError, match="bad signature"):
        signing.verify_model(home, **dict(fields, version="v2"), signature=sig, weights_path=weights)
    with pytest.raises(IntegrityError, match="no signature"):
        signing.verify_model(home, **fields, signature=None, weights_path=weights)
    bad_sig = dict(sig, signature=sig["signature"][:-4] + "AAA=")
    with pytest.raises(IntegrityError):
        signing.verify_model(home, **fields, signature=bad_sig, weights_path=weights)
    weights.write_bytes(weights.read_bytes() + b"!")
    with pytest.raises(IntegrityError, match="sha256"):
        signing.verify_model(home, **fields, signature=sig, weights_path=weights)


def test_signature_from_another_factory_is_refused(tmp_path, home):
    weights, fields, _ = _model(tmp_path, home)
    other = FactoryHome.from_env(tmp_path / "other").ensure()
    signing.create_signing_key(other)
    foreign = signing.sign_model(other, **fields)
    with pytest.raises(IntegrityError, match="signed by key"):
        signing.verify_model(home, **fields, signature=foreign, weights_path=weights)


def test_canonical_json_ignores_key_order():
    assert signing.canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == b'{"a":[1,{"c":3,"d":2}],"b":1}'


# ---- audit ------------------------------------------------------------------------------------------

def test_audit_chain_records_and_verifies(home):
    for i in range(5):
        audit.record(home, actor="ops", action="job.submit", target=f"job{i}", tenant="search" if i % 2 else "ads",
                     detail={"i": i})
    assert audit.verify(home) == 5
    entries = audit.query(home)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == audit.GENESIS and all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    assert [e.target for e in audit.query(home, tenant="search")] == ["job1", "job3"]
    assert len(audit.query(home, action="job")) == 5 and audit.query(home, action="key") == []
    assert [e.target for e in audit.query(home, limit=2)] == ["job3", "job4"]
    assert audit.query(home, since=time.time() + 60) == []
    assert _mode(audit.audit_path(home)) == 0o600


def test_audit_log_refuses_update_and_delete(home):
    audit.record(home, actor="ops", action="job.stop", target="j", tenant="ads")
    db = sqlite3.connect(audit.audit_path(home))
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit_log SET actor = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit_log")
    db.close()
    assert audit.verify(home) == 1


def _tamper(home, sql):
    db = sqlite3.connect(audit.audit_path(home), isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute(sql)
    db.close()


@pytest.mark.parametrize("sql,match", [
    ("UPDATE audit_log SET tenant = 'ads' WHERE seq = 2", "altered"),
    ("UPDATE audit_log SET detail = '{\"i\":9}' WHERE seq = 3", "altered"),
    ("DELETE FROM audit_log WHERE seq = 2", "removed"),
    ("DELETE FROM audit_log WHERE seq = 4", "removed from the end"),
])
def test_audit_tampering_is_detected(home, sql, match):
    for i in range(4):
        audit.record(home, actor="ops", action="budget.set", target=f"t{i}", tenant="search", detail={"i": i})
    _tamper(home, sql)
    with pytest.raises(IntegrityError, match=match):
        audit.verify(home)


def test_audit_rechained_forgery_without_the_key_is_detected(home):
    import hashlib

    audit.record(home, actor="ops", action="job.submit", target="a", tenant="search")
    e = audit.query(home)[0]
    # an attacker recomputes a plain sha256 chain (they do not have the chain key)
    forged = hashlib.sha256(json.dumps([e.seq, repr(e.ts), "mallory"]).encode()).hexdigest()
    _tamper(home, f"UPDATE audit_log SET actor = 'mallory', hash = '{forged}'")
    with pytest.raises(IntegrityError):
        audit.verify(home)


def test_audit_record_validates_and_parse_since():
    with pytest.raises(ConfigError, match="action"):
        audit.record(FactoryHome.from_env("/nonexistent-never-created"), actor="a", action="", target="t")
    now = 1_000_000.0
    assert audit.parse_since("2h", now=now) == now - 7200
    assert audit.parse_since("30m", now=now) == now - 1800
    assert audit.parse_since("1970-01-02") == 86400.0
    assert audit.parse_since("12345") == 12345.0
    with pytest.raises(ConfigError, match="--since"):
        audit.parse_since("yesterday-ish")


# ---- the registry signs at registration and verifies before loading -------------------------------

def test_registry_signs_versions_and_refuses_tampering(tmp_path, home):
    from aifactory.registry import ModelRegistry

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x01" * 4096)
    reg = ModelRegistry(home)
    mv = reg.register("tiny", weights_path=str(weights), model_config={"d_model": 8},
                      manifest={"tenant": "search", "run_id": "r1"})
    assert mv.extra["signature"]["algorithm"] == "ed25519"
    reg.verify(reg.get("tiny", mv.version))

    record = tmp_path / "home" / "registry" / "search" / "tiny" / mv.version / "version.json"
    original = record.read_text()
    data = json.loads(original)
    data["manifest"]["tenant"] = "ads"  # someone re-labels the model's owner
    record.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="signature"):
        reg.verify(reg.get("tiny", mv.version))

    record.write_text(original)
    reg.verify(reg.get("tiny", mv.version))
    with open(mv.weights_path, "r+b") as f:  # one flipped byte in the weights
        f.write(b"\x02")
    with pytest.raises(IntegrityError):
        reg.verify(reg.get("tiny", mv.version))


@pytest.mark.parametrize("text", ["nan", "inf", "-infinity", "1e999h", "9999-12-31T23:59:59-23:59", "0001-01-01"])
def test_parse_since_refuses_non_times(text):
    try:
        value = audit.parse_since(text)
    except ConfigError:
        return
    assert value == value and abs(value) < float("inf")  # if accepted, it is a finite time


def test_registry_by_bare_path_uses_its_own_homes_key(tmp_path, home, monkeypatch):
    """Serve replicas get `<home>/registry` as a string, whatever AIFACTORY_HOME says in their environment."""
    from aifactory.registry import ModelRegistry

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x03" * 512)
    mv = ModelRegistry(home).register("tiny", weights_path=str(weights), model_config={}, manifest={"tenant": "a"})
    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path / "elsewhere"))
    reg = ModelRegistry(home.registry)
    reg.verify(reg.get("tiny", mv.version))
    assert not (tmp_path / "elsewhere" / "security").exists()  # no stray second key was made
