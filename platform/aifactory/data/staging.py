"""A local staging cache for shards on remote storage (``s3://``, ``gs://``, ``hdfs://``, ...).

Training re-reads its shards every epoch; pulling them over the network each time wastes the link and
makes step time depend on it. :func:`stage_locally` copies a split's shards once into
``<cache_dir>/<version>/<split>/...``, verifying each sha256 against the manifest as it copies, and later
calls reuse the copies. Versions are immutable, so a cached shard with the right checksum never goes stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aifactory.data.store import DatasetVersion, join
from aifactory.exceptions import ContractViolation

_CHUNK = 4 << 20


def _sha256_local(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stage_locally(version: DatasetVersion, split: str, cache_dir: str | os.PathLike) -> list[str]:
    """Local paths of the split's shards, copied (and checksummed) into ``cache_dir`` if not there yet."""
    fs, base = version.filesystem()
    root = Path(cache_dir).expanduser() / version.version
    out = []
    for shard in version.manifest.shards_of(split):
        local = root / shard.path
        if local.is_file() and local.stat().st_size == shard.bytes and _sha256_local(local) == shard.sha256:
            out.append(str(local))
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        h = hashlib.sha256()
        try:
            with fs.open_input_stream(join(base, shard.path)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise ContractViolation(join(version.location, shard.path), "shard.present",
                                    "the manifest lists this shard but the file is missing") from None
        if h.hexdigest() != shard.sha256:
            tmp.unlink(missing_ok=True)
            raise ContractViolation(join(version.location, shard.path), "shard.checksum",
                                    f"sha256 {h.hexdigest()[:16]}..., the manifest says {shard.sha256[:16]}...")
        os.replace(tmp, local)  # readers never see a half-copied shard
        out.append(str(local))
    return out
