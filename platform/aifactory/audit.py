"""The audit log: who did what, when. Append-only and hash-chained, so tampering is detectable.

Every component records its actions through one call, once per action::

    from aifactory import audit
    audit.record(home, actor="apikey:3f2a...", action="job.submit", target=job_id, tenant="search",
                 detail={"entrypoint": "python x.py"})

Actions are dotted ``<object>.<verb>`` names: ``job.submit``, ``job.stop``, ``serve.deploy``,
``serve.canary``, ``serve.promote``, ``serve.rollback``, ``bench.run``, ``budget.set``, ``quota.set``,
``key.create``, ``key.rotate``, ``key.revoke``.

Storage: ``<home>/audit.sqlite`` (mode 0600). SQLite triggers refuse UPDATE and DELETE, and each entry
carries ``hash = HMAC-SHA256(chain_key, prev_hash || entry)``, with the chain key in
``<home>/security/audit_chain_key`` (0600). Editing, deleting, reordering or inserting rows breaks the chain
(:func:`verify` names the first bad entry), and without the chain key nobody can forge a consistent one;
dropping rows from the end shows up against SQLite's AUTOINCREMENT counter.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from aifactory.exceptions import ConfigError, IntegrityError
from aifactory.home import FactoryHome

GENESIS = "0" * 64

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
    from aifactory.security import security_dir

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


def record(home: FactoryHome, actor: str, action: str, target: str, tenant: str | None = None,
           detail: Mapping[str, Any] | None = None) -> AuditEntry:
    """Append one entry; call it exactly once per action, after the action succeeded."""
    problems = []
    for field, value in (("actor", actor), ("action", action), ("target", target)):
        if not isinstance(value, str) or not value:
            problems.append(f"{field}: a non-empty string is required (got {value!r})")
    if detail is not None and not isinstance(detail, Mapping):
        problems.append(f"detail: a mapping is required (got {type(detail).__name__})")
    if problems:
        raise ConfigError("audit entry", problems)
    key = _chain_key(home)
    detail_json = _canonical(dict(detail or {}))
    db = _connect(home)
    try:
        db.execute("BEGIN IMMEDIATE")  # serialize writers across processes: one chain, no forks
        try:
            last = db.execute("SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            prev = last["hash"] if last else GENESIS
            seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
            seq = (seq_row["seq"] if seq_row else 0) + 1
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
    return AuditEntry(seq=seq, ts=ts, actor=actor, action=action, target=target, tenant=tenant,
                      detail=json.loads(detail_json), prev_hash=prev, hash=digest)


def query(home: FactoryHome, *, tenant: str | None = None, since: float | None = None,
          action: str | None = None, target: str | None = None, limit: int | None = None) -> list[AuditEntry]:
    """Entries oldest first, filtered by tenant, time (epoch seconds), action prefix and target."""
    if not audit_path(home).exists():
        return []
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
    db = _connect(home)
    try:
        rows = db.execute(sql, args).fetchall()
    finally:
        db.close()
    return [_entry(r) for r in rows]


def verify(home: FactoryHome) -> int:
    """Check the whole chain; returns the number of entries, raises IntegrityError at the first bad one."""
    path = audit_path(home)
    if not path.exists():
        return 0
    key = _chain_key(home)
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
