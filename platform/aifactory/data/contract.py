"""Contract checks: every way a shard or a version can break its manifest, each named by file and rule.

Rules (the ``rule`` of each :class:`~aifactory.exceptions.ContractViolation`):

- ``shard.present``   the shard listed in the manifest exists
- ``shard.size``      its size equals the manifest's (a truncated or appended file fails here)
- ``shard.checksum``  its sha256 equals the manifest's
- ``shard.readable``  it opens as Parquet (footer and metadata intact)
- ``schema.columns``  exactly the contract's columns, in order
- ``schema.dtype``    each column has the contract's Arrow type
- ``shard.rows``      its row count equals the manifest's
- ``nulls``           no nulls in a non-nullable column (``null_policy: forbid``)
- ``tokens.range``    every token id lies in the contract's ``token_range``
- ``manifest.totals`` split totals equal the sums over their shards
- ``drift.rows``      rows per split within ``[min_row_ratio, max_row_ratio]`` of the parent's
- ``drift.tokens``    token distribution within ``max_token_tv_distance`` of the parent's

Nothing is skipped: a reader either gets every shard in the manifest, intact, or an error.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from aifactory.data.manifest import Contract, DatasetManifest, ShardInfo, canonical_dtype
from aifactory.exceptions import ContractViolation

if TYPE_CHECKING:
    import pyarrow.fs

_CHUNK = 4 << 20


def sha256_file(fs: pyarrow.fs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_schema(schema, contract: Contract, *, where: str) -> list[ContractViolation]:
    names = list(schema.names)
    wanted = [c.name for c in contract.columns]
    if names != wanted:
        return [ContractViolation(where, "schema.columns", f"columns are {names}, the contract says {wanted}")]
    out = []
    for col in contract.columns:
        got = canonical_dtype(schema.field(col.name).type)
        if got != col.dtype:
            out.append(ContractViolation(where, "schema.dtype", f"column {col.name!r} is {got}, the contract says {col.dtype}"))
    return out


def check_shard(
    fs: pyarrow.fs.FileSystem, path: str, shard: ShardInfo, contract: Contract, *, where: str | None = None,
    checksum: bool = True, content: bool = False,
) -> list[ContractViolation]:
    """Problems of one shard. ``checksum`` re-hashes the file; ``content`` also reads it (nulls, token range)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    where = where or path
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return [ContractViolation(where, "shard.present", "the manifest lists this shard but the file is missing")]
    out: list[ContractViolation] = []
    if info.size != shard.bytes:
        kind = "truncated" if info.size < shard.bytes else "longer than written"
        out.append(ContractViolation(where, "shard.size", f"{info.size} bytes, the manifest says {shard.bytes} ({kind})"))
    if checksum:
        digest = sha256_file(fs, path)
        if digest != shard.sha256:
            out.append(ContractViolation(where, "shard.checksum", f"sha256 {digest[:16]}..., the manifest says {shard.sha256[:16]}..."))
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            num_rows = pf.metadata.num_rows
            table = pf.read() if content else None
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a bad footer or pages
        out.append(ContractViolation(where, "shard.readable", f"not a readable Parquet file ({type(err).__name__}: {err})"))
        return out
    schema_problems = check_schema(schema, contract, where=where)
    out += schema_problems
    if num_rows != shard.rows:
        out.append(ContractViolation(where, "shard.rows", f"{num_rows} rows, the manifest says {shard.rows}"))
    if table is not None and not schema_problems:
        out += _check_content(table, contract, where=where)
    return out


def _check_content(table, contract: Contract, *, where: str) -> list[ContractViolation]:
    out = []
    for col in contract.columns:
        column = table.column(col.name)
        if contract.null_policy == "forbid" and not col.nullable:
            nulls = column.null_count + sum(chunk.values.null_count for chunk in column.chunks if hasattr(chunk, "values"))
            if nulls:
                out.append(ContractViolation(where, "nulls", f"column {col.name!r} has {nulls} null values; the null policy forbids them"))
        if col.name == "tokens" and len(column):
            values = np.concatenate([chunk.values.to_numpy(zero_copy_only=False) for chunk in column.chunks])
            low, high = contract.token_range
            bad = int(np.count_nonzero((values < low) | (values >= high)))
            if bad:
                out.append(ContractViolation(where, "tokens.range", f"{bad} token ids outside [{low}, {high})"))
    return out


def check_totals(manifest: DatasetManifest, *, where: str) -> list[ContractViolation]:
    out = []
    for split, stats in manifest.splits.items():
        shards = manifest.shards_of(split)
        rows, tokens = sum(s.rows for s in shards), sum(s.tokens for s in shards)
        if (rows, tokens, len(shards)) != (stats.rows, stats.tokens, stats.shards):
            out.append(ContractViolation(
                where, "manifest.totals",
                f"split {split!r} says {stats.rows} rows / {stats.tokens} tokens / {stats.shards} shards, "
                f"its shards add up to {rows} / {tokens} / {len(shards)}",
            ))
    return out


def tv_distance(a: list[int], b: list[int]) -> float:
    """Total-variation distance between two count histograms (0 = same distribution, 1 = disjoint)."""
    pa, pb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if pa.sum() == 0 or pb.sum() == 0:
        return 0.0 if pa.sum() == pb.sum() else 1.0
    n = max(len(pa), len(pb))
    pa, pb = np.pad(pa, (0, n - len(pa))), np.pad(pb, (0, n - len(pb)))
    return float(0.5 * np.abs(pa / pa.sum() - pb / pb.sum()).sum())


def check_drift(new: DatasetManifest, parent: DatasetManifest, *, where: str) -> list[ContractViolation]:
    """Drift of ``new`` against ``parent`` under ``new``'s contract bounds."""
    bounds = new.contract.drift
    out = []
    for split, stats in new.splits.items():
        old = parent.splits.get(split)
        if old is None:
            continue
        ratio = stats.rows / old.rows if old.rows else (1.0 if stats.rows == 0 else float("inf"))
        if not bounds.min_row_ratio <= ratio <= bounds.max_row_ratio:
            out.append(ContractViolation(
                where, "drift.rows",
                f"split {split!r} has {stats.rows} rows vs {old.rows} in parent {parent.version} (ratio {ratio:.3g}, "
                f"allowed [{bounds.min_row_ratio:g}, {bounds.max_row_ratio:g}])",
            ))
        tv = tv_distance(stats.token_histogram, old.token_histogram)
        if tv > bounds.max_token_tv_distance:
            out.append(ContractViolation(
                where, "drift.tokens",
                f"split {split!r} token distribution moved by TV distance {tv:.3f} from parent {parent.version} "
                f"(allowed {bounds.max_token_tv_distance:g})",
            ))
    return out
