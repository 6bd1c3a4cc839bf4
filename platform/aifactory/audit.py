"""The audit log: who did what, when. Append-only and hash-chained, so tampering is detectable.

An action is recorded before it runs and again when it ends, so a crash, a refusal or a failure mid-way
still leaves its trace::

    from aifactory import audit
    with audit.action(home, actor="apikey:3f2a...", action="job.submit", target=submission_id,
                      tenant="search", detail={"entrypoint": "python x.py"}) as act:
        act.target = client.submit(...)      # the outcome row names what the action produced
    # intent row first; on exit an outcome row: ok, failed (with the error) or denied (QuotaExceeded, ...)

or, where the two halves live apart, ``seq = audit.intent(...).seq`` then ``audit.outcome(home, seq, "ok")``.
Refusals that never got as far as an intent (a quota, a budget, a permission) are recorded with
:func:`denied`. :func:`record` appends one plain entry for an action that already succeeded (the older
call, kept for its callers). The phase rides in the entry's ``detail`` (``phase``: ``intent``,
``outcome`` or ``denied``; outcomes also carry ``intent_seq``, ``outcome`` and ``error``), so every
reader of the log shows it.

Actions are dotted ``<object>.<verb>`` names: ``job.submit``, ``job.stop``, ``serve.deploy``,
``serve.canary``, ``serve.promote``, ``serve.rollback``, ``bench.run``, ``budget.set``, ``quota.set``,
``key.create``, ``key.rotate``, ``key.revoke``.

Storage: ``<home>/audit.sqlite`` (mode 0600). SQLite triggers refuse UPDATE and DELETE, and each entry
carries ``hash = HMAC-SHA256(chain_key, prev_hash || entry)``, with the chain key in
``<home>/security/audit_chain_key`` (0600). Editing, deleting, reordering or inserting rows breaks the chain
(:func:`verify` names the first bad entry), and without the chain key nobody can forge a consistent one.
A chain says nothing about rows cut from its end, nor about a file that is gone, so the head of the chain
(last seq and its hash, HMAC'd with the chain key) is also kept outside the database, in the *anchor*
``<home>/security/audit_anchor`` or at ``$AIFACTORY_AUDIT_ANCHOR`` (put it on other storage to survive the
loss of the home). Every append replaces the anchor atomically after its commit; :func:`verify` reports a
log shorter than its anchor ("truncated") or missing while its anchor exists, and :func:`record` refuses
to extend such a log, so a new chain cannot paper over the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from aifactory.exceptions import (
    AuthenticationError, BudgetExceeded, ConfigError, IntegrityError, MeterUnavailable, PermissionDenied,
    QuotaExceeded,
)
from aifactory.home import FactoryHome

GENESIS = "0" * 64

Outcome = Literal["ok", "failed", "denied"]
OUTCOMES: tuple[str, ...] = ("ok", "failed", "denied")
# Refusals: an action that ends in one of these was denied, not failed.
DENIALS: tuple[type[BaseException], ...] = (
    QuotaExceeded, BudgetExceeded, MeterUnavailable, PermissionDenied, AuthenticationError,
)
# detail keys the log writes itself (phase of the entry, link to its intent, how it ended)
_RESERVED = frozenset({"phase", "intent_seq", "outcome", "error"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         REAL NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    tenant     TEXT,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant_ts ON audit_log (tenant, ts);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class AuditEntry(BaseModel):
    seq: int
    ts: float
    actor: str
    action: str
    target: str
    tenant: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    @property
    def time_iso(self) -> str:
        return datetime.fromtimestamp(self.ts, tz=timezone.utc).isoformat(timespec="seconds")


def audit_path(home: FactoryHome) -> Path:
    return home.root / "audit.sqlite"


def _chain_key(home: FactoryHome) -> bytes:
    from aifactory.home import security_dir

    path = security_dir(home) / "audit_chain_key"
    if not path.exists():
        # Write a temp file, then hard-link it into place: atomic and first-writer-wins across processes,
        # so no reader ever sees a half-written key and two processes never chain with different keys.
        tmp = path.with_name(f".audit_chain_key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != 32:
        raise IntegrityError(str(path), "a 32-byte chain key", f"{len(key)} bytes")
    return key


def _connect(home: FactoryHome) -> sqlite3.Connection:
    path = audit_path(home)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.executescript(_SCHEMA)
    return db


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _entry_hash(key: bytes, *, seq: int, ts: float, actor: str, action: str, target: str,
                tenant: str | None, detail: str, prev_hash: str) -> str:
    body = _canonical([seq, repr(ts), actor, action, target, tenant, detail, prev_hash])
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def anchor_path(home: FactoryHome) -> Path:
    """Where the chain's head is kept: ``$AIFACTORY_AUDIT_ANCHOR``, else ``<home>/security/audit_anchor``."""
    override = os.environ.get("AIFACTORY_AUDIT_ANCHOR")
    if override:
        return Path(override).expanduser()
    from aifactory.home import security_dir

    return security_dir(home) / "audit_anchor"


def _anchor_mac(key: bytes, seq: int, digest: str) -> str:
    return hmac.new(key, f"audit-anchor|{seq}|{digest}".encode(), hashlib.sha256).hexdigest()


def _read_anchor(path: Path, key: bytes | None) -> tuple[int, str] | None:
    """``(seq, hash)`` of the anchored head, None if there is no anchor; raises if it is mangled, or forged
    (its MAC is checked unless ``key`` is None)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        seq, digest, mac = int(data["seq"]), str(data["hash"]), str(data["mac"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(str(path), "an audit anchor {seq, hash, mac}", "unreadable content") from None
    if key is not None and not hmac.compare_digest(_anchor_mac(key, seq, digest), mac):
        raise IntegrityError(str(path), "an anchor signed with the audit chain key",
                             "a bad MAC (the anchor was edited, or the chain key replaced)")
    return seq, digest


def _write_anchor(path: Path, key: bytes, seq: int, digest: str) -> None:
    from aifactory.home import write_secret

    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(path, _canonical({"seq": seq, "hash": digest, "mac": _anchor_mac(key, seq, digest)}).encode())


@contextmanager
def _writer_lock(anchor: Path) -> Iterator[None]:
    """One appender at a time across processes, from the insert to the anchor update: without it a slower
    writer could move the anchor back to an older head."""
    anchor.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(anchor.with_name(anchor.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_anchor(path: Path, anchor: tuple[int, str] | None, num_rows: int, hash_at) -> None:
    """Raise if the log (``num_rows`` rows; ``hash_at(seq)`` the hash of a row or None) is behind its anchor.

    A log longer than its anchor is fine: a writer that died between its commit and the anchor update.
    """
    if anchor is None:
        return
    seq, digest = anchor
    if num_rows < seq:
        raise IntegrityError(str(path), f"{seq} entries, as the anchor says",
                             f"{num_rows} (truncated: anchor says {seq} rows, found {num_rows}; "
                             "entries were removed from the end)")
    found = hash_at(seq) if seq > 0 else GENESIS
    if found != digest:
        raise IntegrityError(f"{path}#seq={seq}", f"the anchored hash {digest[:16]}...",
                             f"{str(found)[:16]}... (the log was replaced by another chain)")


def _missing(path: Path, anchor_file: Path, anchor: tuple[int, str]) -> IntegrityError:
    return IntegrityError(str(path), f"{anchor[0]} entries, as the anchor {anchor_file} says",
                          "no file (audit log missing but anchor exists)")


def _check_fields(actor: Any, action: Any, target: Any, detail: Any) -> None:
    problems = []
    for field, value in (("actor", actor), ("action", action), ("target", target)):
        if not isinstance(value, str) or not value:
            problems.append(f"{field}: a non-empty string is required (got {value!r})")
    if detail is not None and not isinstance(detail, Mapping):
        problems.append(f"detail: a mapping is required (got {type(detail).__name__})")
    elif detail:
        problems += [f"detail.{k}: reserved for the audit log's own fields; use another key"
                     for k in sorted(set(detail) & _RESERVED)]
    if problems:
        raise ConfigError("audit entry", problems)


def _append(home: FactoryHome, *, actor: str, action: str, target: str, tenant: str | None,
            detail: Mapping[str, Any]) -> AuditEntry:
    key = _chain_key(home)
    detail_json = _canonical(dict(detail))
    path, anchor_file = audit_path(home), anchor_path(home)
    with _writer_lock(anchor_file):
        anchor = _read_anchor(anchor_file, key)
        if anchor is not None and not path.exists():
            raise _missing(path, anchor_file, anchor)
        db = _connect(home)
        try:
            db.execute("BEGIN IMMEDIATE")  # serialize writers across processes: one chain, no forks
            try:
                seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
                seq = (seq_row["seq"] if seq_row else 0) + 1
                # Never extend a log that lost its tail: the new rows would hide the loss from verify.
                high = db.execute("SELECT MAX(seq) FROM audit_log").fetchone()[0] or 0
                _check_anchor(path, anchor, high, lambda s: _hash_at(db, s))
                last = db.execute("SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
                prev = last["hash"] if last else GENESIS
                ts = time.time()
                digest = _entry_hash(key, seq=seq, ts=ts, actor=actor, action=action, target=target,
                                     tenant=tenant, detail=detail_json, prev_hash=prev)
                db.execute(
                    "INSERT INTO audit_log (seq, ts, actor, action, target, tenant, detail, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, ts, actor, action, target, tenant, detail_json, prev, digest),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()
        # After the commit: a crash in between leaves the anchor one entry behind, which verify accepts,
        # never ahead of the log, which it would report as truncation.
        _write_anchor(anchor_file, key, seq, digest)
    return AuditEntry(seq=seq, ts=ts, actor=actor, action=action, target=target, tenant=tenant,
                      detail=json.loads(detail_json), prev_hash=prev, hash=digest)


def _hash_at(db: sqlite3.Connection, seq: int) -> str | None:
    row = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else row["hash"]


def record(home: FactoryHome, actor: str, action: str, target: str, tenant: str | None = None,
           detail: Mapping[str, Any] | None = None) -> AuditEntry:
    """Append one entry for an action that already succeeded; call it once per action.

    New callers record the intent first: :func:`action` (or :func:`intent` + :func:`outcome`).
    """
    _check_fields(actor, action, target, detail)
    return _append(home, actor=actor, action=action, target=target, tenant=tenant, detail=detail or {})


def intent(home: FactoryHome, *, actor: str, action: str, target: str, tenant: str | None = None,
           detail: Mapping[str, Any] | None = None) -> AuditEntry:
    """Record that ``actor`` is about to do ``action``; close it with :func:`outcome` (its id: ``.seq``)."""
    _check_fields(actor, action, target, detail)
    return _append(home, actor=actor, action=action, target=target, tenant=tenant,
                   detail={**(detail or {}), "phase": "intent"})


def outcome(home: FactoryHome, intent_seq: int, result: Outcome, *, detail: Mapping[str, Any] | None = None,
            error: str | None = None, target: str | None = None) -> AuditEntry:
    """Record how the action of intent ``intent_seq`` ended: ``ok``, ``failed`` (say why in ``error``) or
    ``denied``. Actor, action and tenant are the intent's; ``target`` replaces its target (an id the action
    produced)."""
    problems = []
    if result not in OUTCOMES:
        problems.append(f"result: one of {', '.join(OUTCOMES)} is required (got {result!r})")
    if target is not None and (not isinstance(target, str) or not target):
        problems.append(f"target: a non-empty string is required (got {target!r})")
    if problems:
        raise ConfigError("audit outcome", problems)
    found = [e for e in _rows(home, "SELECT * FROM audit_log WHERE seq = ?", (int(intent_seq),))
             if e.detail.get("phase") == "intent"]
    if not found:
        raise ConfigError("audit outcome", [f"intent_seq: no intent entry with seq {intent_seq}"])
    of = found[0]
    _check_fields(of.actor, of.action, target or of.target, detail)
    extra: dict[str, Any] = {"phase": "outcome", "intent_seq": of.seq, "outcome": result}
    if error is not None:
        extra["error"] = str(error)[:2000]
    return _append(home, actor=of.actor, action=of.action, target=target or of.target, tenant=of.tenant,
                   detail={**(detail or {}), **extra})


def denied(home: FactoryHome, *, actor: str, action: str, target: str, reason: str, tenant: str | None = None,
           detail: Mapping[str, Any] | None = None) -> AuditEntry:
    """Record that ``action`` was refused (a quota, a budget, a permission) before anything ran."""
    _check_fields(actor, action, target, detail)
    return _append(home, actor=actor, action=action, target=target, tenant=tenant,
                   detail={**(detail or {}), "phase": "denied", "outcome": "denied", "error": str(reason)[:2000]})


class Action:
    """The action in progress inside :func:`action`: set ``target`` or add to ``detail`` for its outcome."""

    def __init__(self, entry: AuditEntry):
        self.intent = entry
        self.target = entry.target
        self.detail: dict[str, Any] = {}

    @property
    def seq(self) -> int:
        return self.intent.seq


@contextmanager
def action(home: FactoryHome, *, actor: str, action: str, target: str, tenant: str | None = None,
           detail: Mapping[str, Any] | None = None) -> Iterator[Action]:
    """Record the intent, run the block, record its outcome: ``ok``; ``denied`` for a refusal
    (:data:`DENIALS`); ``failed`` with the error for any other exception, which propagates."""
    act = Action(intent(home, actor=actor, action=action, target=target, tenant=tenant, detail=detail))
    try:
        yield act
    except BaseException as err:
        outcome(home, act.seq, "denied" if isinstance(err, DENIALS) else "failed", detail=act.detail,
                error=f"{type(err).__name__}: {err}", target=act.target)
        raise
    outcome(home, act.seq, "ok", detail=act.detail, target=act.target)


def open_intents(home: FactoryHome) -> list[AuditEntry]:
    """Intents with no outcome yet: actions in progress, or cut short by a crash."""
    entries = query(home)
    closed = {e.detail.get("intent_seq") for e in entries if e.detail.get("phase") == "outcome"}
    return [e for e in entries if e.detail.get("phase") == "intent" and e.seq not in closed]


def _rows(home: FactoryHome, sql: str, args: tuple = ()) -> list[AuditEntry]:
    if not audit_path(home).exists():
        return []
    db = _connect(home)
    try:
        return [_entry(r) for r in db.execute(sql, args).fetchall()]
    finally:
        db.close()


def query(home: FactoryHome, *, tenant: str | None = None, since: float | None = None,
          action: str | None = None, target: str | None = None, limit: int | None = None) -> list[AuditEntry]:
    """Entries oldest first, filtered by tenant, time (epoch seconds), action prefix and target."""
    clauses, args = [], []
    if tenant is not None:
        clauses.append("tenant = ?")
        args.append(tenant)
    if since is not None:
        clauses.append("ts >= ?")
        args.append(since)
    if action is not None:
        clauses.append("(action = ? OR action LIKE ?)")
        args += [action, action.rstrip(".") + ".%"]
    if target is not None:
        clauses.append("target = ?")
        args.append(target)
    sql = "SELECT * FROM audit_log" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY seq"
    if limit is not None:
        sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY seq"
    return _rows(home, sql, tuple(args))


def verify(home: FactoryHome) -> int:
    """Check the whole chain and its anchor; returns the number of entries, raises IntegrityError at the
    first bad one, on a log shorter than its anchor, or on a missing log whose anchor exists."""
    path, anchor_file = audit_path(home), anchor_path(home)
    if not path.exists():
        # No MAC check here: the chain key may be gone with the log, and a forged anchor can only raise
        # this alarm, never silence it.
        anchor = _read_anchor(anchor_file, None)
        if anchor is not None and anchor[0] > 0:
            raise _missing(path, anchor_file, anchor)
        return 0
    key = _chain_key(home)
    anchor = _read_anchor(anchor_file, key)
    db = _connect(home)
    try:
        rows = db.execute("SELECT * FROM audit_log ORDER BY seq").fetchall()
        seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
    finally:
        db.close()
    prev = GENESIS
    for expected_seq, row in enumerate(rows, start=1):
        where = f"{path}#seq={row['seq']}"
        if row["seq"] != expected_seq:
            raise IntegrityError(where, f"entry seq {expected_seq}", f"seq {row['seq']} (entries were removed)")
        if row["prev_hash"] != prev:
            raise IntegrityError(where, f"prev_hash {prev[:16]}...", f"{row['prev_hash'][:16]}...")
        digest = _entry_hash(key, seq=row["seq"], ts=row["ts"], actor=row["actor"], action=row["action"],
                             target=row["target"], tenant=row["tenant"], detail=row["detail"],
                             prev_hash=row["prev_hash"])
        if not hmac.compare_digest(digest, row["hash"]):
            raise IntegrityError(where, f"hash {digest[:16]}...", f"{row['hash'][:16]}... (entry was altered)")
        prev = row["hash"]
    _check_anchor(path, anchor, len(rows), lambda s: rows[s - 1]["hash"])
    high = seq_row["seq"] if seq_row else 0
    if high != len(rows):
        raise IntegrityError(str(path), f"{high} entries", f"{len(rows)} (entries were removed from the end)")
    return len(rows)


_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_REL_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float | None = None) -> float:
    """``"2h"``/``"30m"``/``"7d"`` ago, an ISO date or datetime (UTC unless it says), or epoch seconds."""
    now = time.time() if now is None else now
    problem = ConfigError("--since", [f"{text!r} is not a time: use e.g. 2h, 30m, 7d, 2025-01-31 or "
                                      "2025-01-31T12:00:00+00:00"])
    m = _REL.match(text)
    try:
        if m:
            value = now - float(m.group(1)) * _REL_S[m.group(2)]
        else:
            try:
                value = float(text)
            except ValueError:
                dt = datetime.fromisoformat(text.strip())
                value = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    except (ValueError, OverflowError, OSError):
        raise problem from None
    if not math.isfinite(value):  # "nan", "inf", 1e999h: not a time
        raise problem
    return value


def _entry(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(seq=row["seq"], ts=row["ts"], actor=row["actor"], action=row["action"],
                      target=row["target"], tenant=row["tenant"], detail=json.loads(row["detail"]),
                      prev_hash=row["prev_hash"], hash=row["hash"])
