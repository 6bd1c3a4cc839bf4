"""Security of the factory: per-tenant API keys, signed artifacts, and the keys' home on disk.

- :mod:`aifactory.security.apikeys`: API keys stored hashed (salted SHA-256 of a 256-bit secret, compared in
  constant time), rotatable and revocable, each with a role (``tenant`` or ``admin``).
- :mod:`aifactory.security.signing`: the factory's ed25519 signing key; signs registry manifests at
  registration and verifies them (and the weights' sha256) before anything loads them.

The audit log lives in :mod:`aifactory.audit` (every component records through it).
Secrets live under ``<home>/security/`` with mode 0600 (directory 0700): :func:`aifactory.home.security_dir`
and :func:`aifactory.home.write_secret`, re-exported here.
"""

from __future__ import annotations

from aifactory.home import security_dir, write_secret

__all__ = ["security_dir", "write_secret"]
