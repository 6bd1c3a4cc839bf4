"""The factory home: where the dataset store, model registry, checkpoints, ledger and cluster state live.

``AIFACTORY_HOME`` (default ``~/.aifactory``) is the root. Each store may be moved elsewhere, to a local
path or a URI that pyarrow understands (``s3://``, ``gs://``, ``hdfs://``, ``file://``), so that every node
of a multi-node cluster sees the same data: set ``AIFACTORY_<STORE>_URI`` (e.g.
``AIFACTORY_DATASETS_URI=s3://bucket/datasets``) or write ``<home>/config.yaml``::

    storage:
      datasets: s3://bucket/aifactory/datasets
      checkpoints: s3://bucket/aifactory/checkpoints

The ledger (SQLite) and the cluster state are always local files.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from aifactory.config import StrictModel, parse_config, read_yaml

if TYPE_CHECKING:
    import pyarrow.fs

STORES = ("datasets", "registry", "checkpoints", "bench")


class StorageConfig(StrictModel):
    datasets: str | None = Field(default=None, description="Dataset store: a path or URI.")
    registry: str | None = Field(default=None, description="Model registry: a path or URI.")
    checkpoints: str | None = Field(default=None, description="Ray Train storage_path: a path or URI.")
    bench: str | None = Field(default=None, description="Benchmark results: a path or URI.")


class HomeConfig(StrictModel):
    storage: StorageConfig = Field(default_factory=StorageConfig)


def is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class FactoryHome:
    """Resolved locations of the factory's state. Build it with :meth:`FactoryHome.from_env`."""

    root: Path
    storage: StorageConfig

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> FactoryHome:
        root = Path(root or os.environ.get("AIFACTORY_HOME") or Path.home() / ".aifactory").expanduser()
        cfg_path = root / "config.yaml"
        storage = (
            parse_config(HomeConfig, read_yaml(cfg_path), source=str(cfg_path)).storage
            if cfg_path.is_file()
            else StorageConfig()
        )
        for store in STORES:
            env = os.environ.get(f"AIFACTORY_{store.upper()}_URI")
            if env:
                storage = storage.model_copy(update={store: env})
        return cls(root=root.resolve(), storage=storage)

    def location(self, store: str) -> str:
        """The path or URI of a store (``datasets``, ``registry``, ``checkpoints``, ``bench``)."""
        if store not in STORES:
            raise ValueError(f"unknown store {store!r}; expected one of {STORES}")
        configured = getattr(self.storage, store)
        if configured:
            return configured if is_uri(configured) else str(Path(configured).expanduser().resolve())
        return str(self.root / store)

    @property
    def datasets(self) -> str:
        return self.location("datasets")

    @property
    def registry(self) -> str:
        return self.location("registry")

    @property
    def checkpoints(self) -> str:
        return self.location("checkpoints")

    @property
    def bench(self) -> str:
        return self.location("bench")

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def ensure(self) -> FactoryHome:
        """Create the local directories (URIs are created lazily by their writers)."""
        for path in (self.root, self.cluster_dir, self.runs_dir):
            path.mkdir(parents=True, exist_ok=True)
        for store in STORES:
            loc = self.location(store)
            if not is_uri(loc):
                Path(loc).mkdir(parents=True, exist_ok=True)
        return self


def filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI, as pyarrow and Ray Data take them."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def security_dir(home: FactoryHome) -> Path:
    """``<home>/security``, created 0700: only the operator's account reads keys and hashes.

    Part of the home's layout (here, not in :mod:`aifactory.security`) because the base layer's audit log
    keeps its chain key and anchor there too, and the base layer imports no component."""
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
