"""The manifest of a dataset version: what is in it, where it came from, and the contract it keeps.

``manifest.json`` sits beside the shards. It records the Arrow schema, row and token counts per shard and
per split, per-shard sha256 checksums and sizes, the source, the lineage (code version, ingest parameters,
parent version), the creation time, and the contract: columns and dtypes, the null policy, the allowed
token-id range and the allowed drift against the parent version.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal

from pydantic import Field

from aifactory.config import StrictModel

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ColumnSpec(StrictModel):
    name: str = Field(description="Column name.")
    dtype: str = Field(description="Arrow type, canonical text (see canonical_dtype), e.g. fixed_size_list<uint16>[128].")
    nullable: bool = Field(default=False, description="Whether nulls are allowed in this column.")


class DriftBounds(StrictModel):
    """How far a version may move from its parent (the previous version of the same source and params)."""

    min_row_ratio: float = Field(default=0.5, gt=0, description="Lowest allowed rows(new)/rows(parent) per split.")
    max_row_ratio: float = Field(default=2.0, gt=0, description="Highest allowed rows(new)/rows(parent) per split.")
    max_token_tv_distance: float = Field(
        default=0.15, ge=0, le=1,
        description="Highest allowed total-variation distance between the token-id distributions of a split.",
    )


class Contract(StrictModel):
    columns: list[ColumnSpec] = Field(description="Exactly these columns, in this order, with these dtypes.")
    null_policy: Literal["forbid", "allow"] = Field(
        default="forbid", description="'forbid': no null rows or null elements in any non-nullable column."
    )
    token_range: tuple[int, int] = Field(description="Allowed token ids, [low, high) (the tokenizer's vocabulary).")
    drift: DriftBounds = Field(default_factory=DriftBounds, description="Allowed drift against the parent version.")


class ShardInfo(StrictModel):
    path: str = Field(description="Path relative to the version directory, e.g. train/part-00000.parquet.")
    split: str = Field(description="train or validation.")
    rows: int = Field(ge=0, description="Rows (packed sequences) in the shard.")
    tokens: int = Field(ge=0, description="Non-padding tokens in the shard.")
    bytes: int = Field(ge=0, description="File size in bytes.")
    sha256: str = Field(description="sha256 of the file's bytes.")


class SplitStats(StrictModel):
    rows: int = Field(ge=0, description="Rows in the split.")
    tokens: int = Field(ge=0, description="Non-padding tokens in the split.")
    documents: int = Field(ge=0, description="Source documents in the split.")
    shards: int = Field(ge=0, description="Shard files in the split.")
    token_histogram: list[int] = Field(description="Count of each token id (the drift bound compares these).")


class SourceInfo(StrictModel):
    location: str = Field(description="The source directory or URI that was ingested.")
    num_files: int = Field(ge=0, description="Files ingested (after the size cap).")
    bytes: int = Field(ge=0, description="Bytes ingested.")
    digest: str = Field(description="sha256 over the sorted (relative path, content sha256) pairs.")
    max_bytes: int | None = Field(default=None, description="The size cap that selected the files, if any.")


class Lineage(StrictModel):
    code_version: str = Field(description="Git commit of the factory that wrote the version.")
    code_dirty: bool = Field(description="Whether that checkout had uncommitted changes.")
    ingest_code_digest: str = Field(description="Hash of the ingest code (tokenizer, packing, ingest modules).")
    tokenizer: dict[str, Any] = Field(description="Tokenizer name, version and special ids.")
    params: dict[str, Any] = Field(description="Ingest parameters (seq_len, split, shard size, seed).")
    parent: str | None = Field(default=None, description="The previous version of the same source and params.")


class DatasetManifest(StrictModel):
    format_version: int = Field(default=FORMAT_VERSION, description="Manifest format version.")
    kind: Literal["tokens"] = Field(default="tokens", description="What the rows are.")
    version: str = Field(description="Content-addressed version id.")
    created_at: str = Field(description="UTC creation time, ISO 8601.")
    tenant: str = Field(description="Tenant the ingest ran for.")
    project: str = Field(default="default", description="Project within the tenant.")
    seq_len: int = Field(gt=1, description="Tokens per row.")
    vocab_size: int = Field(gt=0, description="Tokenizer vocabulary size.")
    arrow_schema: str = Field(description="The shards' Arrow schema as text.")
    splits: dict[str, SplitStats] = Field(description="Per-split counts.")
    shards: list[ShardInfo] = Field(description="Every shard with its counts and checksum.")
    source: SourceInfo = Field(description="What was ingested.")
    lineage: Lineage = Field(description="How it was made.")
    contract: Contract = Field(description="The rules every reader checks.")

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.splits.values())

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]


def canonical_dtype(arrow_type) -> str:
    """An Arrow type as text, without list field names (Parquet round trips rename ``item`` to ``element``)."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arrow_type):
        return f"fixed_size_list<{canonical_dtype(arrow_type.value_type)}>[{arrow_type.list_size}]"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"list<{canonical_dtype(arrow_type.value_type)}>"
    return str(arrow_type)


def token_column_type(seq_len: int):
    import pyarrow as pa

    return pa.list_(pa.uint16(), seq_len)


def tokens_contract(seq_len: int, vocab_size: int, drift: DriftBounds | None = None) -> Contract:
    return Contract(
        columns=[ColumnSpec(name="tokens", dtype=canonical_dtype(token_column_type(seq_len)), nullable=False)],
        null_policy="forbid",
        token_range=(0, vocab_size),
        drift=drift or DriftBounds(),
    )


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
