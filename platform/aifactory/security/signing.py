"""Signed artifacts: the control plane's ed25519 key signs registry manifests; every loader verifies.

At registration the control plane (:mod:`aifactory.registry.service`) signs a document that binds the model
version's tenant namespace, name, version, weights sha256, ``servable`` flag, model config and manifest
(lineage included: parent, parent digest, run, dataset) (:func:`model_document`), serialized as canonical
JSON (sorted keys, no spaces, UTF-8). Before anything loads the weights, :func:`verify_model` checks the
signature against the control plane's public key and re-hashes the weights file: a changed manifest, a
flipped ``servable``, a record moved to another tenant, a changed weights file, a signature from another
key or a missing signature all raise :class:`~aifactory.exceptions.IntegrityError`.

Keys: ``<home>/security/signing_key.pem`` (private, PKCS#8, mode 0600), created only by the control plane's
own start (:func:`create_signing_key`, called by ``factory up``), never on first use: a process without it
gets :class:`SigningKeyUnavailable` saying where registration goes instead. Verification needs only the
public key: ``AIFACTORY_SIGNING_PUBLIC_KEY`` (a PEM, or a path to one), which ``factory up`` puts in the
environment of every Ray process, else ``<home>/security/signing_key.pub.pem``; it is never generated on a
verifier either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aifactory.exceptions import FactoryError, IntegrityError
from aifactory.home import FactoryHome
from aifactory.security import security_dir, write_secret

ALGORITHM = "ed25519"
PUBLIC_KEY_ENV = "AIFACTORY_SIGNING_PUBLIC_KEY"
DOCUMENT_KIND = "aifactory.model_version/v2"
_CHUNK = 1 << 20


class SigningKeyUnavailable(FactoryError):
    """This process holds no signing (or verification) key; it must not make one up."""

    def __init__(self, what: str, path: str, hint: str):
        self.what, self.path, self.hint = what, path, hint
        super().__init__(f"no {what} at {path}: {hint}")

    def __reduce__(self):
        return (self.__class__, (self.what, self.path, self.hint))


def canonical_json(obj: Any) -> bytes:
    """The bytes that get signed: sorted keys, no whitespace, UTF-8 (non-JSON types raise TypeError)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _paths(home: FactoryHome) -> tuple[Path, Path]:
    d = security_dir(home)
    return d / "signing_key.pem", d / "signing_key.pub.pem"


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def create_signing_key(home: FactoryHome) -> str:
    """Create the control plane's key pair under ``home`` unless it exists; return its key id.

    Called explicitly by the control plane's start (``factory up``), never as a side effect of signing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, _ = _paths(home)
    if not private_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # Link into place so that two processes creating the key at once end up with one key.
        tmp = private_path.with_name(f".signing_key.{os.getpid()}.{threading.get_ident()}.tmp")
        write_secret(tmp, pem)
        try:
            os.link(tmp, private_path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return Signer(home).key_id


class Signer:
    """The control plane's signing key (it must exist: :func:`create_signing_key`)."""

    def __init__(self, home: FactoryHome):
        from cryptography.hazmat.primitives import serialization

        private_path, public_path = _paths(home)
        try:
            pem = private_path.read_bytes()
        except FileNotFoundError:
            raise SigningKeyUnavailable(
                "signing key", str(private_path),
                "only the control plane signs models; register through it (a job launched through the control "
                "API carries a registration credential), or start the factory with `factory up`, which creates "
                "the key") from None
        except PermissionError:
            raise SigningKeyUnavailable(
                "readable signing key", str(private_path),
                "it belongs to the control plane's OS user; register through the control API") from None
        self._key = serialization.load_pem_private_key(pem, password=None)
        public = self._key.public_key()
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = _key_id(raw)
        pub_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not public_path.exists() or public_path.read_bytes() != pub_pem:
            public_path.write_bytes(pub_pem)
            os.chmod(public_path, 0o644)

    def sign(self, document: Mapping[str, Any]) -> dict[str, str]:
        """A detached signature record: ``{"algorithm", "key_id", "signature"}`` (base64)."""
        sig = self._key.sign(canonical_json(dict(document)))
        return {"algorithm": ALGORITHM, "key_id": self.key_id, "signature": base64.b64encode(sig).decode()}


def public_key_pem(home: FactoryHome, *, from_env: bool = True) -> bytes:
    """The control plane's public key (PEM): ``$AIFACTORY_SIGNING_PUBLIC_KEY`` (PEM or path), else the home's file."""
    env = os.environ.get(PUBLIC_KEY_ENV, "").strip() if from_env else ""
    if env:
        return env.encode() if env.startswith("-----BEGIN") else Path(env).expanduser().read_bytes()
    public_path = home.root / "security" / "signing_key.pub.pem"
    try:
        return public_path.read_bytes()
    except OSError:
        raise SigningKeyUnavailable(
            "public signing key", str(public_path),
            f"set {PUBLIC_KEY_ENV} to the control plane's public key (`factory up` sets it on its Ray processes)"
        ) from None


def public_key(home: FactoryHome):
    """The control plane's public key; SigningKeyUnavailable if this node was given none (never generated)."""
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(public_key_pem(home))


def verify_document(home: FactoryHome, document: Mapping[str, Any], signature: Mapping[str, str] | None,
                    *, where: str) -> None:
    """Raise IntegrityError unless ``signature`` is the factory key's signature of ``document``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    if not signature:
        raise IntegrityError(where, "an ed25519 signature", "no signature")
    if signature.get("algorithm") != ALGORITHM:
        raise IntegrityError(where, f"algorithm {ALGORITHM}", f"algorithm {signature.get('algorithm')!r}")
    key = public_key(home)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if signature.get("key_id") != _key_id(raw):
        raise IntegrityError(where, f"signed by key {_key_id(raw)}", f"signed by key {signature.get('key_id')!r}")
    try:
        sig = base64.b64decode(signature.get("signature", ""), validate=True)
        key.verify(sig, canonical_json(dict(document)))
    except (InvalidSignature, ValueError, TypeError):
        raise IntegrityError(where, "a valid signature of the manifest", "a bad signature (manifest altered?)") from None


def verify_file(path: str | Path, expected_sha256: str) -> None:
    """Raise IntegrityError unless the file's sha256 is ``expected_sha256``."""
    if not Path(path).is_file():
        raise IntegrityError(str(path), f"sha256 {expected_sha256}", "no such file")
    actual = sha256_file(path)
    if not hmac.compare_digest(actual, str(expected_sha256)):
        raise IntegrityError(str(path), f"sha256 {expected_sha256}", f"sha256 {actual}")


def model_document(*, name: str, version: str, sha256: str, model_config: Mapping[str, Any],
                   manifest: Mapping[str, Any], tenant: str | None = None, servable: bool = True) -> dict[str, Any]:
    """What a model version's signature covers: everything a loader trusts about it (its tenant namespace and
    ``servable`` included, so neither can be changed or moved without the control plane's key)."""
    return {
        "kind": DOCUMENT_KIND,
        "tenant": tenant,
        "servable": bool(servable),
        "name": name,
        "version": str(version),
        "sha256": sha256,
        "model_config": dict(model_config),
        "manifest": dict(manifest),
    }


def sign_model(home: FactoryHome, *, name: str, version: str, sha256: str, model_config: Mapping[str, Any],
               manifest: Mapping[str, Any], tenant: str | None = None, servable: bool = True) -> dict[str, str]:
    """Sign a model version at registration; store the returned record next to its manifest."""
    doc = model_document(name=name, version=version, sha256=sha256, model_config=model_config, manifest=manifest,
                         tenant=tenant, servable=servable)
    return Signer(home).sign(doc)


def verify_model(home: FactoryHome, *, name: str, version: str, sha256: str, model_config: Mapping[str, Any],
                 manifest: Mapping[str, Any], signature: Mapping[str, str] | None, weights_path: str | Path,
                 where: str | None = None, tenant: str | None = None, servable: bool = True) -> None:
    """Verify a model version before loading it: the manifest's signature, then the weights' sha256."""
    doc = model_document(name=name, version=version, sha256=sha256, model_config=model_config, manifest=manifest,
                         tenant=tenant, servable=servable)
    verify_document(home, doc, signature, where=where or f"model {name}:{version} manifest")
    verify_file(weights_path, sha256)
