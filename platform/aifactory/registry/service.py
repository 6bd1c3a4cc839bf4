"""Registration as a service: the control plane registers and signs; everyone else asks it to.

Why: a model used to be registered by the training worker itself, stamped with whatever tenant the job's
arguments claimed (`python -m jobs.train --tenant b` from tenant ``a`` registered as ``b``) and signed with a
key the worker created when it found none. Now:

- **Who may register, as whom.** A job launched through the control API (``POST /v1/jobs``) gets a
  *registration grant*: a random secret bound to its tenant and its Ray submission id, stored hashed here
  (:class:`RegistrationGrants`) and handed to the job as ``AIFACTORY_REGISTRATION_TOKEN`` with the control
  plane's URL (``AIFACTORY_REGISTRATION_URL``). The job's trainer sends weights and manifest to
  ``POST /v1/models/register`` (:mod:`aifactory.control.routes_registry`); the control plane stamps the
  grant's tenant (never the job's ``--tenant``), refuses grants of jobs that have ended, and signs.
- **Where.** Each tenant has its own namespace (:mod:`aifactory.registry.store`).
- **The operator's own runs** (``factory train``, tests, ``factory run``) run where the signing key is
  readable: :class:`LocalRegistrar` registers in-process, as the tenant the operator named. A process with
  neither a grant nor the key gets :class:`~aifactory.security.signing.SigningKeyUnavailable` saying so.

Limit (see the README's trust model): on one shared Ray cluster, job code can read other jobs' environment
unless the cluster runs its processes as a user that cannot; a grant confines a job to its submitter's
tenant against its own arguments, not against another tenant's code on the same cluster.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.exceptions import AuthenticationError, ConfigError, FactoryError
from aifactory.home import FactoryHome
from aifactory.registry.store import ModelRegistry, ModelVersion
from aifactory.security import security_dir

TOKEN_ENV = "AIFACTORY_REGISTRATION_TOKEN"
URL_ENV = "AIFACTORY_REGISTRATION_URL"
PREFIX = "aifr"
MAX_WEIGHTS_BYTES = 512 << 20
"""The largest weights file one registration request carries (the request body, as raw bytes)."""
DEFAULT_TTL_S = 7 * 24 * 3600.0
_TOKEN_RE = re.compile(r"^aifr_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registration_grants (
    grant_id      TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    project       TEXT NOT NULL,
    submission_id TEXT NOT NULL,
    digest        BLOB NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Grant:
    """Who a registration credential registers as: the tenant that launched the job, never the job's word."""

    grant_id: str
    tenant: str
    project: str
    submission_id: str

    @property
    def actor(self) -> str:
        return f"job:{self.submission_id}"


class RegistrationGrants:
    """Job-scoped registration credentials of one factory home (control-plane state, mode 0600)."""

    def __init__(self, home: FactoryHome):
        self.path: Path = security_dir(home) / "registration_grants.sqlite"
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def issue(self, *, tenant: str, project: str, submission_id: str, ttl_s: float = DEFAULT_TTL_S) -> str:
        """A new credential for the job ``submission_id`` of ``tenant``; only its hash is kept."""
        grant_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT INTO registration_grants VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (grant_id, tenant, project, submission_id, _digest(grant_id, secret), now, now + ttl_s))
        return f"{PREFIX}_{grant_id}_{secret}"

    def authenticate(self, token: str | None) -> Grant:
        m = _TOKEN_RE.match(token or "")
        if not m:
            raise AuthenticationError("missing or malformed registration credential (aifr_...)")
        grant_id, secret = m.groups()
        with self._connect() as db:
            row = db.execute("SELECT * FROM registration_grants WHERE grant_id = ?", (grant_id,)).fetchone()
        ok = hmac.compare_digest(_digest(grant_id, secret), row["digest"] if row else b"\0" * 32)
        if not row or not ok:
            raise AuthenticationError("invalid registration credential")
        if row["expires_at"] <= time.time():
            raise AuthenticationError(f"registration credential {grant_id} has expired")
        return Grant(grant_id=grant_id, tenant=row["tenant"], project=row["project"],
                     submission_id=row["submission_id"])

    def revoke_job(self, submission_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM registration_grants WHERE submission_id = ?", (submission_id,))


def _digest(grant_id: str, secret: str) -> bytes:
    return hashlib.sha256(f"{grant_id}:{secret}".encode()).digest()


def is_grant_token(token: str | None) -> bool:
    return bool(token) and token.startswith(f"{PREFIX}_")


def grant_env(home: FactoryHome, *, tenant: str, project: str, submission_id: str, url: str) -> dict[str, str]:
    """The environment a job launched by the control plane gets: a fresh grant and where to use it."""
    token = RegistrationGrants(home).issue(tenant=tenant, project=project, submission_id=submission_id)
    return {TOKEN_ENV: token, URL_ENV: url.rstrip("/")}


# ---- the control plane's side --------------------------------------------------------------------------

def register_for(home: FactoryHome, tenant: str, name: str, *, weights_path: str, model_config: Mapping[str, Any],
                 manifest: Mapping[str, Any], servable: bool = True) -> ModelVersion:
    """Register in ``tenant``'s namespace, signed (needs the signing key: the control plane only).

    The tenant is the caller's authenticated one; ``manifest["tenant"]`` is overwritten with it. Idempotent
    per ``(manifest.run_id, manifest.step)``: a resumed training attempt that replays a step gets the version
    it registered before."""
    registry = ModelRegistry(home, tenant=tenant)
    _check_lineage(registry, tenant, manifest)
    run_id, step = manifest.get("run_id"), manifest.get("step")
    if run_id is not None and step is not None:
        existing = registry.find_run_step(tenant, name, run_id, step)
        if existing is not None:
            return existing
    return registry.register(name, weights_path=weights_path, model_config=model_config, manifest=manifest,
                             servable=servable, tenant=tenant)


def _check_lineage(registry: ModelRegistry, tenant: str, manifest: Mapping[str, Any]) -> None:
    """A variant's ``parent`` must be a version in the same namespace, with the digest the manifest names:
    the signature then vouches for lineage the control plane checked, not for what a job claimed."""
    from aifactory.exceptions import NotFound

    parent = manifest.get("parent")
    if parent is None:
        return
    name, _, version = str(parent).partition(":")
    try:
        mv = registry.get(name, version or None)
    except (NotFound, ConfigError):
        raise ConfigError("model registration", [f"manifest.parent: {parent!r} is not a model version of tenant "
                                                 f"{tenant!r}"]) from None
    expected = manifest.get("parent_sha256")
    if expected is not None and expected != mv.sha256:
        raise ConfigError("model registration", [f"manifest.parent_sha256: {expected!r} is not the digest of "
                                                 f"{tenant}/{mv.ref} ({mv.sha256})"])


# ---- the caller's side ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """How a process registers: through the control plane (``url`` + ``token``), or in-process (neither)."""

    url: str | None = None
    token: str | None = None

    @classmethod
    def from_env(cls) -> Registration:
        url, token = os.environ.get(URL_ENV), os.environ.get(TOKEN_ENV)
        if bool(url) != bool(token):
            raise ConfigError("registration", [f"{URL_ENV} and {TOKEN_ENV}: set both or neither"])
        return cls(url=url or None, token=token or None)

    def to_dict(self) -> dict[str, str | None]:
        return {"url": self.url, "token": self.token}

    def registrar(self, home: FactoryHome, *, tenant: str):
        """``tenant``: who the operator's in-process registration registers as (ignored by the control plane,
        which stamps the grant's tenant)."""
        if self.url:
            return RemoteRegistrar(self.url, self.token or "")
        return LocalRegistrar(home, tenant)


class LocalRegistrar:
    """In-process registration where this process is the control plane (it can read the signing key)."""

    def __init__(self, home: FactoryHome, tenant: str):
        self.home, self.tenant = home, tenant

    def register(self, name: str, *, weights_path: str, model_config: Mapping[str, Any],
                 manifest: Mapping[str, Any], servable: bool = True) -> ModelVersion:
        return register_for(self.home, self.tenant, name, weights_path=weights_path, model_config=model_config,
                            manifest=manifest, servable=servable)


class RegistrationRefused(FactoryError):
    """The control plane refused a registration (the status and its reason)."""

    def __init__(self, status: int, reason: str):
        self.status, self.reason = status, reason
        super().__init__(f"the control plane refused the registration (HTTP {status}): {reason}")

    def __reduce__(self):
        return (self.__class__, (self.status, self.reason))


class RemoteRegistrar:
    """Registration through the control plane's ``POST /v1/models/register`` with a job's grant."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 300.0):
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s

    def register(self, name: str, *, weights_path: str, model_config: Mapping[str, Any],
                 manifest: Mapping[str, Any], servable: bool = True) -> ModelVersion:
        size = os.path.getsize(weights_path)
        if size > MAX_WEIGHTS_BYTES:
            raise ConfigError("registration", [f"weights_path: {size} bytes exceeds the {MAX_WEIGHTS_BYTES} a "
                                               "registration request carries"])
        meta = json.dumps({"name": name, "model_config": dict(model_config), "manifest": dict(manifest),
                           "servable": servable,
                           "weights_suffix": ".safetensors" if weights_path.endswith(".safetensors") else ".pt"})
        with open(weights_path, "rb") as f:
            weights = f.read()
        req = urllib.request.Request(
            f"{self.url}/v1/models/register", data=weights, method="POST",
            headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {self.token}",
                     "X-Aifactory-Registration": base64.urlsafe_b64encode(meta.encode()).decode().rstrip("=")})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raw = err.read().decode(errors="replace")
            try:
                reason = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                reason = raw[:500]
            raise RegistrationRefused(err.code, reason) from None
        except (urllib.error.URLError, OSError) as err:
            raise RegistrationRefused(0, f"the control plane at {self.url} did not answer ({err})") from None
        return ModelVersion(**data)
