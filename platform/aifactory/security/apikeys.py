"""Per-tenant API keys for the factory control API: stored hashed, rotatable, revocable, with an admin role.

A key reads ``aifk_<key_id>_<secret>``: ``key_id`` (16 hex digits) finds the row, ``secret`` (256 random
bits) proves possession. Only ``sha256(salt || secret)`` with a per-key random salt is stored, in a SQLite
database under ``<home>/security/`` (mode 0600). A slow KDF (scrypt) buys nothing for a 256-bit random
secret and would cost ~50 ms per request; the salt keeps equal secrets from hashing alike. Digests are
compared with :func:`hmac.compare_digest` (constant time).

Roles: ``tenant`` keys act for exactly one tenant; ``admin`` keys (no tenant) see and act on everything.
Rotation issues a new key for the same tenant, role and name and revokes the old one (at once, or after a
grace period so running clients can switch). Every creation, rotation and revocation is audited.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aifactory import audit
from aifactory.exceptions import AuthenticationError, ConfigError, NotFound
from aifactory.home import FactoryHome
from aifactory.provenance import whoami
from aifactory.security import security_dir
from aifactory.tenancy import _check_tenant

PREFIX = "aifk"
ROLES = ("tenant", "admin")
_KEY_RE = re.compile(r"^aifk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    tenant      TEXT,
    role        TEXT NOT NULL CHECK (role IN ('tenant', 'admin')),
    name        TEXT NOT NULL,
    salt        BLOB NOT NULL,
    digest      BLOB NOT NULL,
    created_at  REAL NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  REAL,
    rotated_to  TEXT
);
"""


@dataclass(frozen=True)
class Principal:
    """Who an authenticated request acts as."""

    key_id: str
    tenant: str | None
    role: str
    name: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"apikey:{self.key_id}"

    def can_see(self, tenant: str | None) -> bool:
        """Whether this caller may read or act on work of ``tenant``."""
        return self.is_admin or (tenant is not None and tenant == self.tenant)


@dataclass(frozen=True)
class KeyInfo:
    """A key's public description (never its secret or digest)."""

    key_id: str
    tenant: str | None
    role: str
    name: str
    created_at: float
    created_by: str
    revoked_at: float | None
    rotated_to: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None or self.revoked_at > time.time()

    def to_dict(self) -> dict:
        return {**asdict(self), "active": self.active}


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: ``secret`` is shown once and never stored."""

    info: KeyInfo
    secret: str


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


class KeyStore:
    """The API keys of one factory home."""

    def __init__(self, home: FactoryHome):
        self.home = home
        self.path: Path = security_dir(home) / "api_keys.sqlite"
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        os.chmod(self.path, 0o600)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def create(self, *, tenant: str | None, role: str = "tenant", name: str = "default",
               actor: str | None = None) -> IssuedKey:
        """Issue a key. Tenant keys need a valid tenant; admin keys have none."""
        problems = []
        if role not in ROLES:
            problems.append(f"role: must be one of {ROLES} (got {role!r})")
        elif role == "tenant":
            if not tenant:
                problems.append("tenant: a tenant key needs a tenant")
            else:
                try:
                    _check_tenant(tenant)
                except ValueError as err:
                    problems.append(f"tenant: {err}")
        elif tenant:
            problems.append(f"tenant: an admin key acts for every tenant; do not give one (got {tenant!r})")
        if not name or len(name) > 64 or not name.isprintable():
            problems.append(f"name: 1-64 printable characters (got {name!r})")
        if problems:
            raise ConfigError("API key", problems)
        actor = actor or whoami()
        issued = self._insert(tenant=tenant if role == "tenant" else None, role=role, name=name, actor=actor)
        audit.record(self.home, actor=actor, action="key.create", target=issued.info.key_id,
                     tenant=issued.info.tenant, detail={"role": role, "name": name})
        return issued

    def _insert(self, *, tenant: str | None, role: str, name: str, actor: str,
                db: sqlite3.Connection | None = None) -> IssuedKey:
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = os.urandom(16)
        now = time.time()
        sql = ("INSERT INTO api_keys (key_id, tenant, role, name, salt, digest, created_at, created_by) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        args = (key_id, tenant, role, name, salt, _digest(salt, secret), now, actor)
        if db is None:
            with self._connect() as own:
                own.execute(sql, args)
        else:
            db.execute(sql, args)
        info = KeyInfo(key_id, tenant, role, name, now, actor, None, None)
        return IssuedKey(info=info, secret=f"{PREFIX}_{key_id}_{secret}")

    def authenticate(self, key: str | None) -> Principal:
        """The principal a presented key acts as; raises AuthenticationError for anything else."""
        m = _KEY_RE.match(key or "")
        if not m:
            raise AuthenticationError("missing or malformed API key: send `Authorization: Bearer aifk_...`")
        key_id, secret = m.groups()
        with self._connect() as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        # Hash even for unknown ids so that timing does not tell which key ids exist.
        salt = row["salt"] if row else b"\0" * 16
        ok = hmac.compare_digest(_digest(salt, secret), row["digest"] if row else b"\0" * 32)
        if not row or not ok:
            raise AuthenticationError("invalid API key")
        if row["revoked_at"] is not None and row["revoked_at"] <= time.time():
            raise AuthenticationError(f"API key {key_id} was revoked or rotated; use its replacement")
        return Principal(key_id=key_id, tenant=row["tenant"], role=row["role"], name=row["name"])

    def get(self, key_id: str) -> KeyInfo:
        with self._connect() as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound("API key", key_id, "`factory keys list` shows the keys")
        return _info(row)

    def list(self, tenant: str | None = None, *, include_revoked: bool = True) -> list[KeyInfo]:
        with self._connect() as db:
            if tenant is None:
                rows = db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
            else:
                rows = db.execute("SELECT * FROM api_keys WHERE tenant = ? ORDER BY created_at",
                                  (tenant,)).fetchall()
        infos = [_info(r) for r in rows]
        return infos if include_revoked else [i for i in infos if i.active]

    def rotate(self, key_id: str, *, grace_s: float = 0.0, actor: str | None = None) -> IssuedKey:
        """Issue a replacement of ``key_id`` (same tenant, role, name); the old key stops after ``grace_s``."""
        if grace_s < 0:
            raise ConfigError("key rotation", [f"grace_s: must be >= 0 (got {grace_s})"])
        actor = actor or whoami()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # two concurrent rotations must not both succeed
            try:
                row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
                if row is None:
                    raise NotFound("API key", key_id, "`factory keys list` shows the keys")
                old = _info(row)
                if not old.active or old.rotated_to:
                    raise ConfigError("key rotation", [f"key_id: {key_id} is already revoked or rotated"])
                issued = self._insert(tenant=old.tenant, role=old.role, name=old.name, actor=actor, db=db)
                db.execute("UPDATE api_keys SET revoked_at = ?, rotated_to = ? WHERE key_id = ?",
                           (time.time() + grace_s, issued.info.key_id, key_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        audit.record(self.home, actor=actor, action="key.rotate", target=key_id, tenant=old.tenant,
                     detail={"new_key_id": issued.info.key_id, "grace_s": grace_s})
        return issued

    def revoke(self, key_id: str, *, actor: str | None = None) -> KeyInfo:
        """Revoke a key now; revoking an already revoked key changes nothing and is not audited again."""
        actor = actor or whoami()
        with self._connect() as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound("API key", key_id, "`factory keys list` shows the keys")
            if _info(row).active:
                db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (time.time(), key_id))
                changed = True
            else:
                changed = False
        if changed:
            audit.record(self.home, actor=actor, action="key.revoke", target=key_id, tenant=row["tenant"],
                         detail={})
        return self.get(key_id)


def _info(row: sqlite3.Row) -> KeyInfo:
    return KeyInfo(row["key_id"], row["tenant"], row["role"], row["name"], row["created_at"],
                   row["created_by"], row["revoked_at"], row["rotated_to"])
