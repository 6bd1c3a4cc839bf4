"""A file-based model registry under ``FactoryHome.registry`` (a local path or a pyarrow URI).

Layout::

    <registry>/<name>/v<N>/weights.pt      one consolidated file (torch.save of a state_dict, or .safetensors)
    <registry>/<name>/v<N>/version.json    name, version, sha256, model_config, manifest, created_at, servable

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
_VERSION_RE = re.compile(r"^v(\d+)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model."""

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

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

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


def _signed(home: FactoryHome, record: ModelVersion) -> ModelVersion:
    """``record`` with the factory's ed25519 signature of its manifest in ``extra["signature"]``."""
    from aifactory.security.signing import sign_model

    sig = sign_model(home, name=record.name, version=record.version, sha256=record.sha256,
                     model_config=record.model_config, manifest=record.manifest)
    return ModelVersion(**(record.to_dict() | {"extra": {**record.extra, "signature": sig}}))


def _version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    return int(m.group(1)) if m else 0


class ModelRegistry:
    """Register, list, fetch and verify model versions. Knows neither training nor serving."""

    def __init__(self, home: FactoryHome | str | Path):
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
    ) -> ModelVersion:
        """Copy ``weights_path`` into the registry as the next version of ``name``; return the new version."""
        problems = []
        if not _NAME_RE.match(name or ""):
            problems.append(f"name: {name!r} is not a model name (lowercase letters, digits, '.', '_', '-')")
        src_fs, src = filesystem(weights_path)
        import pyarrow.fs as pafs

        if src_fs.get_file_info(src).type != pafs.FileType.File:
            problems.append(f"weights_path: no such file {weights_path!r}")
        full_manifest = {k: None for k in MANIFEST_KEYS} | dict(manifest)
        for what, obj in (("model_config", model_config), ("manifest", full_manifest)):
            try:
                json.dumps(obj, allow_nan=True)
            except (TypeError, ValueError) as err:
                problems.append(f"{what}: not JSON-serialisable ({err})")
        if problems:
            raise ConfigError(f"model registration of {name!r}", problems)

        suffix = ".safetensors" if src.endswith(".safetensors") else ".pt"
        model_dir = self._join(name)
        self._fs.create_dir(model_dir, recursive=True)
        staging = self._join(name, f".staging-{uuid.uuid4().hex[:12]}")
        self._fs.create_dir(staging, recursive=True)
        try:
            digest, size = self._copy_hashing(src_fs, src, f"{staging}/weights{suffix}")
            for _ in range(1000):
                version = f"v{self._next_number(name)}"
                record = ModelVersion(
                    name=name,
                    version=version,
                    weights_path=self._public(self._join(name, version, f"weights{suffix}")),
                    sha256=digest,
                    model_config=dict(model_config),
                    manifest=full_manifest,
                    created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    servable=servable,
                    size_bytes=size,
                )
                record = _signed(self._home, record)
                if self._commit(staging, self._join(name, version), record):
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
        """Mark a version (not) servable, e.g. to withdraw a bad model from ``get(name)``."""
        mv = self.get(name, version)
        updated = ModelVersion(**(mv.to_dict() | {"servable": servable}))
        path = self._join(name, version, RECORD)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self._fs.open_output_stream(tmp) as f:
            f.write(json.dumps(updated.to_dict(), indent=2, sort_keys=True).encode())
        self._fs.move(tmp, path)
        return updated

    # ---- read --------------------------------------------------------------------------------------
    def _next_number(self, name: str) -> int:
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(self._join(name), allow_not_found=True))
        return 1 + max((_version_number(i.base_name) for i in infos), default=0)

    def _read(self, name: str, version: str) -> ModelVersion | None:
        path = self._join(name, version, RECORD)
        try:
            with self._fs.open_input_stream(path) as f:
                data = json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None
        return ModelVersion(**data)

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every committed version, by name then version number."""
        import pyarrow.fs as pafs

        names = [name] if name else sorted(
            i.base_name
            for i in self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
            if i.type == pafs.FileType.Directory and _NAME_RE.match(i.base_name)
        )
        out = []
        for n in names:
            infos = self._fs.get_file_info(pafs.FileSelector(self._join(n), allow_not_found=True))
            for v in sorted((i.base_name for i in infos if _VERSION_RE.match(i.base_name)), key=_version_number):
                mv = self._read(n, v)
                if mv is not None:
                    out.append(mv)
        return out

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """A version of ``name``; ``None`` means the newest servable one."""
        if version is not None:
            mv = self._read(name, version) if _VERSION_RE.match(version) else None
            if mv is None:
                raise NotFound("model version", f"{name}:{version}", "`factory models` lists the registered versions")
            return mv
        servable = [mv for mv in self.list(name) if mv.servable]
        if not servable:
            raise NotFound("servable model", name, "train one with `factory train`; `factory models` lists versions")
        return servable[-1]

    def verify_signature(self, mv: ModelVersion) -> ModelVersion:
        """Check the factory's ed25519 signature of the version's manifest; IntegrityError if it does not match."""
        from aifactory.security.signing import model_document, verify_document

        doc = model_document(name=mv.name, version=mv.version, sha256=mv.sha256, model_config=mv.model_config,
                             manifest=mv.manifest)
        verify_document(self._home, doc, mv.extra.get("signature"), where=f"model {mv.ref} ({RECORD})")
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
        self.get(name, version)
        path = self._join(name, version)
        if self._local:
            shutil.rmtree(path)
        else:
            self._fs.delete_dir(path)
