"""A file-based model registry under ``FactoryHome.registry`` (a local path or a pyarrow URI).

Layout: one namespace per tenant, so model names are the tenant's own (tenant ``b`` resolving "the newest
``gpt-tiny``" never sees ``a``'s versions, and each namespace numbers its own versions)::

    <registry>/<tenant>/<name>/v<N>/weights.pt      one consolidated file (torch.save of a state_dict, or .safetensors)
    <registry>/<tenant>/<name>/v<N>/version.json    tenant, name, version, sha256, model_config, manifest, servable, signature

Only the control plane writes (:mod:`aifactory.registry.service`: it stamps the tenant from the
authenticated submitter and signs with a key only it holds); everyone else reads. A ``ModelRegistry(home,
tenant="b")`` is b's view; an unscoped one (the operator's) takes ``tenant/name`` or a name only one tenant
has. A record that does not sit where it says it belongs (tenant, name, version) is ignored, and resolving
"the newest servable" skips versions whose signature does not verify, so a record copied or forged into a
namespace never becomes its default.

Registration is atomic: everything is written into a hidden staging directory which is then renamed to
``v<N>`` (on a local filesystem a rename onto an existing, non-empty directory fails, so two concurrent
registrations never share a version; the loser takes the next number). On object stores, where a rename is
a copy, ``version.json`` is written last and is the commit marker: readers ignore a version without it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aifactory.exceptions import ConfigError, IntegrityError, NotFound
from aifactory.home import FactoryHome, filesystem, is_uri

RECORD = "version.json"
MANIFEST_KEYS = ("dataset_version", "code_version", "config_hash", "seed", "metrics", "tenant", "run_id", "parent")
"""Provenance every manifest carries (missing ones are recorded as null, never invented)."""

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")
_TENANT_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_VERSION_RE = re.compile(r"^v(\d+)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model, in its tenant's namespace."""

    name: str
    version: str
    weights_path: str
    sha256: str
    model_config: dict[str, Any]
    manifest: dict[str, Any]
    created_at: str = ""
    servable: bool = True
    size_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""

    @property
    def ref(self) -> str:
        """``name:version`` within the tenant's namespace."""
        return f"{self.name}:{self.version}"

    @property
    def qualified_ref(self) -> str:
        """``tenant/name:version``: one version, unambiguous in any view that may see it."""
        return f"{self.tenant}/{self.name}:{self.version}"

    @property
    def qualified_name(self) -> str:
        """``tenant/name``: the name an unscoped registry resolves without ambiguity."""
        return f"{self.tenant}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file or a pyarrow URI, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _home_of(location: str) -> FactoryHome:
    if not is_uri(location):
        parent = Path(location).expanduser().resolve().parent
        if (parent / "security" / "signing_key.pub.pem").is_file():
            return FactoryHome.from_env(parent)
    return FactoryHome.from_env()


def _document(record: ModelVersion) -> dict[str, Any]:
    from aifactory.security.signing import model_document

    return model_document(name=record.name, version=record.version, sha256=record.sha256,
                          model_config=record.model_config, manifest=record.manifest, tenant=record.tenant,
                          servable=record.servable)


def _signed(home: FactoryHome, record: ModelVersion) -> ModelVersion:
    """``record`` with the control plane's ed25519 signature in ``extra["signature"]`` (SigningKeyUnavailable
    in any process that does not hold the key)."""
    from aifactory.security.signing import Signer

    sig = Signer(home).sign(_document(record))
    return ModelVersion(**(record.to_dict() | {"extra": {**record.extra, "signature": sig}}))


def _check_name(what: str, value: str | None) -> str | None:
    return None if _NAME_RE.match(value or "") and "/" not in (value or "") else \
        f"{what}: {value!r} is not a model name (lowercase letters, digits, '.', '_', '-')"


def split_name(name: str) -> tuple[str | None, str]:
    """``"t/gpt"`` -> ``("t", "gpt")``; ``"gpt"`` -> ``(None, "gpt")``."""
    tenant, slash, bare = (name or "").rpartition("/")
    return (tenant or None, bare) if slash else (None, name)


def _version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    return int(m.group(1)) if m else 0


class ModelRegistry:
    """Register, list, fetch and verify model versions. Knows neither training nor serving.

    ``tenant``: this view sees only that tenant's namespace (``None``: every tenant's, for operators)."""

    def __init__(self, home: FactoryHome | str | Path, *, tenant: str | None = None):
        self.tenant = tenant
        self.location = home.registry if isinstance(home, FactoryHome) else str(home)
        # The factory's signing key lives under the home (aifactory.security.signing), even when the
        # registry itself is a URI or a bare path: a bare `<home>/registry` path (as Serve replicas get it)
        # finds its home's key next to it, anything else uses $AIFACTORY_HOME.
        self._home = home if isinstance(home, FactoryHome) else _home_of(str(home))
        self._fs, self._root = filesystem(self.location)
        self._local = not is_uri(self.location)

    # ---- paths -------------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    def _public(self, path: str) -> str:
        """A path as users see it: local paths stay paths; object-store paths get their scheme back."""
        if self._local:
            return path
        scheme = self.location.split("://", 1)[0]
        return f"{scheme}://{path}"

    # ---- write -------------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        weights_path: str,
        model_config: Mapping[str, Any],
        manifest: Mapping[str, Any],
        servable: bool = True,
        tenant: str | None = None,
    ) -> ModelVersion:
        """Copy ``weights_path`` into ``tenant``'s namespace as the next version of ``name``, signed; return it.

        Only the control plane calls this (it needs the signing key): ``tenant`` is the authenticated
        submitter's (default: this view's tenant), and it overrides whatever ``manifest["tenant"]`` said."""
        problems = []
        # The caller holds the signing key (checked below), so it is the control plane or the operator: the
        # tenant it names, else the manifest's (the operator's own registrations).
        tenant = tenant or self.tenant or (manifest or {}).get("tenant")
        if self.tenant is not None and tenant != self.tenant:
            problems.append(f"tenant: this registry view is {self.tenant!r}'s, not {tenant!r}'s")
        if not tenant:
            problems.append("tenant: a model version is registered in a tenant's namespace; none was given")
        else:
            from aifactory.tenancy import TenantRef

            try:
                TenantRef(tenant=tenant)
            except ValueError as err:
                problems.append(f"tenant: {tenant!r} is not a tenant name ({str(err).splitlines()[-1].strip()})")
        if problem := _check_name("name", name):
            problems.append(problem)
        src_fs, src = filesystem(weights_path)
        import pyarrow.fs as pafs

        if src_fs.get_file_info(src).type != pafs.FileType.File:
            problems.append(f"weights_path: no such file {weights_path!r}")
        full_manifest = {k: None for k in MANIFEST_KEYS} | dict(manifest) | {"tenant": tenant}
        for what, obj in (("model_config", model_config), ("manifest", full_manifest)):
            try:
                json.dumps(obj, allow_nan=True)
            except (TypeError, ValueError) as err:
                problems.append(f"{what}: not JSON-serialisable ({err})")
        if problems:
            raise ConfigError(f"model registration of {name!r}", problems)

        from aifactory.security.signing import Signer

        Signer(self._home)  # no key, no copy: fail before writing anything
        suffix = ".safetensors" if src.endswith(".safetensors") else ".pt"
        model_dir = self._join(tenant, name)
        self._fs.create_dir(model_dir, recursive=True)
        staging = self._join(tenant, name, f".staging-{uuid.uuid4().hex[:12]}")
        self._fs.create_dir(staging, recursive=True)
        try:
            digest, size = self._copy_hashing(src_fs, src, f"{staging}/weights{suffix}")
            for _ in range(1000):
                version = f"v{self._next_number(tenant, name)}"
                record = ModelVersion(
                    tenant=tenant,
                    name=name,
                    version=version,
                    weights_path=self._public(self._join(tenant, name, version, f"weights{suffix}")),
                    sha256=digest,
                    model_config=dict(model_config),
                    manifest=full_manifest,
                    created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    servable=servable,
                    size_bytes=size,
                )
                record = _signed(self._home, record)
                if self._commit(staging, self._join(tenant, name, version), record):
                    return record
            raise RuntimeError(f"could not allocate a version for {name!r}")  # pragma: no cover
        finally:
            if self._fs.get_file_info(staging).type != pafs.FileType.NotFound:
                self._fs.delete_dir(staging)

    def _copy_hashing(self, src_fs, src: str, dst: str) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        with src_fs.open_input_stream(src) as fin, self._fs.open_output_stream(dst) as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def _commit(self, staging: str, final: str, record: ModelVersion) -> bool:
        """Move ``staging`` to ``final`` with the record; False when another writer took ``final`` first."""
        blob = json.dumps(record.to_dict(), indent=2, sort_keys=True).encode()
        if self._local:
            with open(f"{staging}/{RECORD}", "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.rename(staging, final)  # atomic; fails with ENOTEMPTY/EEXIST when the version is taken
            except OSError:
                if os.path.isdir(final):
                    return False
                raise
            return True
        import pyarrow.fs as pafs

        if self._fs.get_file_info(f"{final}/{RECORD}").type != pafs.FileType.NotFound:
            return False
        self._fs.copy_file(f"{staging}/{Path(record.weights_path).name}", f"{final}/{Path(record.weights_path).name}")
        with self._fs.open_output_stream(f"{final}/{RECORD}") as f:  # commit marker, written last
            f.write(blob)
        return True

    def set_servable(self, name: str, version: str, servable: bool) -> ModelVersion:
        """Mark a version (not) servable, e.g. to withdraw a bad model from ``get(name)``; re-signed (the
        signature covers ``servable``), so only the control plane can."""
        mv = self.get(name, version)
        updated = _signed(self._home, ModelVersion(**(mv.to_dict() | {"servable": servable})))
        path = self._join(mv.tenant, mv.name, version, RECORD)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self._fs.open_output_stream(tmp) as f:
            f.write(json.dumps(updated.to_dict(), indent=2, sort_keys=True).encode())
        self._fs.move(tmp, path)
        return updated

    # ---- read --------------------------------------------------------------------------------------
    def _next_number(self, tenant: str, name: str) -> int:
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(self._join(tenant, name), allow_not_found=True))
        return 1 + max((_version_number(i.base_name) for i in infos), default=0)

    def _dirs(self, *parts: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(self._join(*parts) if parts else self._root,
                                                         allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and _NAME_RE.match(i.base_name))

    def _read(self, tenant: str, name: str, version: str) -> ModelVersion | None:
        path = self._join(tenant, name, version, RECORD)
        try:
            with self._fs.open_input_stream(path) as f:
                data = json.loads(f.read())
            mv = ModelVersion(**data)
        except (FileNotFoundError, OSError, ValueError, TypeError):
            return None
        if (mv.tenant, mv.name, mv.version) != (tenant, name, version):
            return None  # a record copied or moved into another place than the one it was signed for
        return mv

    def tenants(self) -> list[str]:
        """The namespaces this view sees."""
        if self.tenant is not None:
            return [self.tenant]
        return [t for t in self._dirs() if _TENANT_RE.match(t)]

    def _scope(self, name: str) -> tuple[list[str], str]:
        """``(namespaces to look in, bare name)`` for ``name`` (``tenant/name`` or a bare name)."""
        tenant, bare = split_name(name)
        if tenant is None:
            return self.tenants(), bare
        if not _TENANT_RE.match(tenant):
            return [], bare
        if self.tenant is not None and tenant != self.tenant:
            return [], bare  # another tenant's model: exactly like one that does not exist
        return [tenant], bare

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every committed version this view sees, by tenant, name, then version number."""
        if name is not None:
            tenants, bare = self._scope(name)
            pairs = [(t, bare) for t in tenants]
        else:
            pairs = [(t, n) for t in self.tenants() for n in self._dirs(t)]
        out = []
        for t, n in pairs:
            for v in sorted((v for v in self._dirs(t, n) if _VERSION_RE.match(v)), key=_version_number):
                mv = self._read(t, n, v)
                if mv is not None:
                    out.append(mv)
        return out

    def _signature_ok(self, mv: ModelVersion) -> bool:
        try:
            self.verify_signature(mv)
        except IntegrityError:
            return False
        return True

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """A version of ``name`` (``tenant/name``, or a bare name); ``None`` means the newest servable one
        whose signature verifies. An unscoped view refuses a bare name that several tenants use."""
        label = f"{name}:{version}" if version else name
        tenants, bare = self._scope(name)
        found = [t for t in tenants if self._dirs(t, bare)] if _NAME_RE.match(bare or "") else []
        if len(found) > 1:
            raise ConfigError("model name", [f"name: {bare!r} is registered by tenants {', '.join(found)}; "
                                             f"name one: {found[0]}/{bare}"])
        if not found:
            raise NotFound("model version" if version else "servable model", label,
                           "train one with `factory train`; `factory models` lists versions")
        tenant = found[0]
        if version is not None:
            mv = self._read(tenant, bare, version) if _VERSION_RE.match(version) else None
            if mv is None:
                raise NotFound("model version", label, "`factory models` lists the registered versions")
            return mv
        for mv in reversed(self.list(f"{tenant}/{bare}")):
            if mv.servable and self._signature_ok(mv):
                return mv
        raise NotFound("servable model", label, "train one with `factory train`; `factory models` lists versions")

    def find_run_step(self, tenant: str, name: str, run_id: str, step: int | None) -> ModelVersion | None:
        """The version ``run_id`` registered at ``step`` in ``tenant``'s namespace, if any (a resumed attempt
        replays the steps after its checkpoint)."""
        for mv in self.list(f"{tenant}/{name}"):
            if mv.manifest.get("run_id") == run_id and mv.manifest.get("step") == step:
                return mv
        return None

    def verify_signature(self, mv: ModelVersion) -> ModelVersion:
        """Check the factory's ed25519 signature of the version's manifest; IntegrityError if it does not match."""
        from aifactory.security.signing import verify_document

        verify_document(self._home, _document(mv), mv.extra.get("signature"),
                        where=f"model {mv.qualified_name}:{mv.version} ({RECORD})")
        return mv

    def verify(self, mv: ModelVersion) -> ModelVersion:
        """Check the manifest's signature, then re-hash the weights; raise IntegrityError on any mismatch."""
        self.verify_signature(mv)
        try:
            actual = sha256_file(mv.weights_path)
        except (FileNotFoundError, OSError):
            actual = "<missing file>"
        if actual != mv.sha256:
            raise IntegrityError(mv.weights_path, mv.sha256, actual)
        return mv

    def remove(self, name: str, version: str) -> None:
        """Delete a version (its weights and record)."""
        mv = self.get(name, version)
        path = self._join(mv.tenant, mv.name, version)
        if self._local:
            shutil.rmtree(path)
        else:
            self._fs.delete_dir(path)
