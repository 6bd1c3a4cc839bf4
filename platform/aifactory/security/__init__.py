"""Security of the factory: per-tenant API keys, signed artifacts, and the keys' home on disk.

- :mod:`aifactory.security.apikeys`: API keys stored hashed (salted SHA-256 of a 256-bit secret, compared in
  constant time), rotatable and revocable, each with a role (``tenant`` or ``admin``).
- :mod:`aifactory.security.signing`: the factory's ed25519 signing key; signs registry manifests at
  registration and verifies them (and the weights' sha256) before anything loads them.

The audit log lives in :mod:`aifactory.audit` (every component records through it).
Secrets live under ``<home>/security/`` with mode 0600 (directory 0700).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from aifactory.home import FactoryHome


def security_dir(home: FactoryHome) -> Path:
    """``<home>/security``, created 0700: only the operator's account reads keys and hashes."""
    path = home.root / "security"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically (never world-readable, not even for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per thread too
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    os.chmod(path, 0o600)
