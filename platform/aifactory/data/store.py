"""The dataset store: immutable, content-addressed dataset versions published atomically.

Layout under the factory home's ``datasets`` location (a local path or a pyarrow/fsspec URI)::

    <datasets>/ds-<hash>/manifest.json
    <datasets>/ds-<hash>/train/part-00000.parquet ...
    <datasets>/ds-<hash>/validation/part-00000.parquet ...
    <datasets>/.tmp-ds-<hash>-<nonce>/            an ingest in progress (never listed)

A version is visible exactly when ``<version>/manifest.json`` exists. On a local filesystem an ingest
writes everything (manifest last) into a ``.tmp-`` directory and renames it into place, one atomic
``rename``: a killed ingest leaves only a hidden temp directory. Object stores have no directory rename,
so there shards go straight under the version prefix and the manifest, one atomic PUT, is written last.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aifactory.config import parse_config
from aifactory.data.contract import check_drift, check_shard, check_totals
from aifactory.data.manifest import MANIFEST_NAME, DatasetManifest
from aifactory.exceptions import ContractViolation, DataError, NotFound
from aifactory.home import FactoryHome, filesystem, is_uri

if TYPE_CHECKING:
    import pyarrow.fs

VERSION_PREFIX = "ds-"
TMP_PREFIX = ".tmp-"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class DatasetVersion:
    """One published version: its manifest and where its shards are."""

    version: str
    manifest: DatasetManifest
    location: str  # the version directory: a local path or a URI

    def files(self, split: str) -> list[str]:
        """Paths (or URIs) of the split's Parquet shards, in manifest order."""
        if split not in self.manifest.splits:
            raise NotFound("split", split, f"dataset {self.version} has splits {sorted(self.manifest.splits)}")
        return [join(self.location, s.path) for s in self.manifest.shards_of(split)]

    @property
    def manifest_path(self) -> str:
        return join(self.location, MANIFEST_NAME)

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        return filesystem(self.location)

    def check(self, *, splits: list[str] | None = None, checksum: bool = True, content: bool = False,
              parent: DatasetVersion | None = None) -> list[ContractViolation]:
        """Every contract problem of this version (empty when it is intact)."""
        fs, base = self.filesystem()
        problems = check_totals(self.manifest, where=self.manifest_path)
        for shard in self.manifest.shards:
            if splits is not None and shard.split not in splits:
                continue
            problems += check_shard(fs, join(base, shard.path), shard, self.manifest.contract,
                                    where=join(self.location, shard.path), checksum=checksum, content=content)
        if parent is not None:
            problems += check_drift(self.manifest, parent.manifest, where=self.manifest_path)
        return problems

    def validate(self, *, splits: list[str] | None = None, checksum: bool = True) -> None:
        """Raise the first :class:`ContractViolation` (mentioning how many more there are), if any."""
        problems = self.check(splits=splits, checksum=checksum)
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more problems; `factory datasets verify {self.version}` lists them)" if len(problems) > 1 else ""
            raise ContractViolation(first.path, first.rule, first.detail + more)


class DatasetStore:
    """Versions under ``home.datasets``. ``get(None)`` is the newest version."""

    prefix = VERSION_PREFIX
    manifest_cls: type = DatasetManifest
    kind = "dataset version"

    def __init__(self, home: FactoryHome, *, location: str | None = None):
        self.home = home
        self.location = location or self.default_location(home)
        self.fs, self.base = filesystem(self.location)

    @staticmethod
    def default_location(home: FactoryHome) -> str:
        return home.datasets

    # reading ---------------------------------------------------------------------------------------------
    def _load(self, version: str) -> DatasetVersion | None:
        path = join(self.base, version, MANIFEST_NAME)
        try:
            with self.fs.open_input_stream(path) as f:
                raw = f.read()
        except (FileNotFoundError, OSError):
            return None
        where = join(self.location, version, MANIFEST_NAME)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ContractViolation(where, "manifest.readable", f"not valid JSON ({err})") from None
        manifest = parse_config(self.manifest_cls, data, source=where)
        if manifest.version != version:
            raise ContractViolation(where, "manifest.version", f"says version {manifest.version!r} but lives in {version!r}")
        return DatasetVersion(version=version, manifest=manifest, location=join(self.location, version))

    def exists(self, version: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(join(self.base, version, MANIFEST_NAME)).type == pafs.FileType.File

    def list(self) -> list[DatasetVersion]:
        """Published versions, oldest first (by creation time, then id)."""
        import pyarrow.fs as pafs

        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except FileNotFoundError:
            return []
        versions = []
        for entry in entries:
            name = entry.base_name
            if entry.type == pafs.FileType.Directory and name.startswith(self.prefix):
                v = self._load(name)
                if v is not None:
                    versions.append(v)
        return sorted(versions, key=lambda v: (v.manifest.created_at, v.version))

    def get(self, version: str | None = None) -> DatasetVersion:
        if version is None:
            versions = self.list()
            if not versions:
                raise NotFound(self.kind, "(newest)", f"the store {self.location} is empty")
            return versions[-1]
        found = self._load(version)
        if found is None:
            raise NotFound(self.kind, version, f"the store {self.location} has {[v.version for v in self.list()] or 'none'}")
        return found

    def parent_of(self, v: DatasetVersion) -> DatasetVersion | None:
        lineage = getattr(v.manifest, "lineage", None)  # embedding manifests have none
        parent = lineage.parent if lineage else None
        if not parent:
            return None
        return self._load(parent)

    def verify(self, version: str) -> list[ContractViolation]:
        """Full check: every checksum, schema, row count, nulls, token range, and drift against the parent."""
        v = self.get(version)
        return v.check(checksum=True, content=True, parent=self.parent_of(v))

    # writing ---------------------------------------------------------------------------------------------
    @contextmanager
    def publishing(self, version: str) -> Iterator[Pending]:
        """Write a version into a hidden place; :meth:`Pending.commit` makes it visible atomically.

        On any exception (or if the block ends without a commit) the partial output is removed; a process
        that is killed leaves a hidden ``.tmp-`` directory that no reader sees.
        """
        local = not is_uri(self.location)
        if local:
            os.makedirs(self.base, exist_ok=True)
            name = f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        else:
            name = version
        pending = Pending(self, version, name, local=local)
        try:
            yield pending
        finally:
            if not pending.committed:
                pending.discard()

    def remove_stale_temp(self) -> list[str]:
        """Delete ``.tmp-`` directories left by killed ingests (only call when no ingest is running)."""
        import pyarrow.fs as pafs

        removed = []
        for entry in self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True)):
            if entry.base_name.startswith(TMP_PREFIX):
                self.fs.delete_dir(entry.path)
                removed.append(entry.base_name)
        return removed


class Pending:
    """A version being written: shards go under :attr:`path` (``fs`` path) / :attr:`uri`."""

    def __init__(self, store: DatasetStore, version: str, name: str, *, local: bool):
        self.store, self.version, self.local = store, version, local
        self.path = join(store.base, name)
        self.uri = join(store.location, name)
        self.committed = False
        self.raced = False  # another ingest published the same version first
        store.fs.create_dir(self.path, recursive=True)

    def commit(self, manifest) -> DatasetVersion:
        if manifest.version != self.version:
            raise DataError(f"manifest version {manifest.version} != pending version {self.version}")
        fs = self.store.fs
        with fs.open_output_stream(join(self.path, MANIFEST_NAME)) as f:
            f.write(manifest.model_dump_json(indent=2).encode())
        if self.local:
            final = join(self.store.base, self.version)
            try:
                os.rename(self.path, final)
            except OSError:
                if not self.store.exists(self.version):
                    raise
                self.raced = True  # same content, already there: ours is redundant
                fs.delete_dir(self.path)
        self.committed = True
        return self.store.get(self.version)

    def discard(self) -> None:
        try:
            self.store.fs.delete_dir(self.path)
        except (FileNotFoundError, OSError):
            pass
