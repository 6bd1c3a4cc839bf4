"""A versioned retrieval index: a batch-embedding version's vectors in a faiss index, published like a dataset.

Layout under ``<datasets>/indexes`` (the :class:`~aifactory.data.store.DatasetStore` pattern: a version is visible
exactly when its ``manifest.json`` exists; it is written under a hidden ``.tmp-`` name and renamed into place)::

    idx-<hash>/index.faiss      faiss.serialize_index of the vectors (inner product = cosine: they are normalized)
    idx-<hash>/chunks.parquet   row i of the index: doc_id, passage, text, source (what a citation resolves to)
    idx-<hash>/manifest.json    tenant, lineage (the embedding version, its dataset source, the model's digest),
                                 the index parameters, and each file's size and sha256

The version hashes the embedding version, the tenant, the embedding model's digest, the index parameters and
this module, so rebuilding unchanged input is a cache hit. faiss is the reference library for exact (flat) and
approximate (HNSW) vector search on CPU, in process and without a server.

:func:`load_index` refuses an index before any search when a file's sha256 differs from its manifest
(:class:`~aifactory.exceptions.IntegrityError`), when it belongs to another tenant
(:class:`~aifactory.exceptions.PermissionDenied`) or when it was built with another embedding model than the
caller's (:class:`~aifactory.exceptions.EmbeddingModelMismatch`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.data.contract import sha256_file
from aifactory.data.embed import SPLIT as EMBEDDING_SPLIT
from aifactory.data.embed import EmbeddingStore
from aifactory.data.manifest import utc_now
from aifactory.data.store import DatasetStore, join
from aifactory.exceptions import EmbeddingModelMismatch, IntegrityError, NotFound, PermissionDenied
from aifactory.home import FactoryHome
from aifactory.provenance import code_version
from aifactory.retrieval.model import EmbeddingModelId

INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.parquet"


class IndexParams(StrictModel):
    """How the vectors are indexed."""

    kind: Literal["flat", "hnsw"] = Field(
        "flat", description="'flat': exact inner-product search (every vector compared; right up to ~1e5 chunks); "
        "'hnsw': faiss's HNSW graph, approximate and sub-linear for larger corpora.")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW: neighbours per node (kind 'hnsw' only).")
    hnsw_ef_search: int = Field(64, ge=1, le=4096, description="HNSW: candidates explored per query.")


class IndexFile(StrictModel):
    path: str = Field(description="Path relative to the version directory.")
    bytes: int = Field(ge=0, description="File size in bytes.")
    sha256: str = Field(description="sha256 of the file's bytes.")


class IndexLineage(StrictModel):
    embedding_version: str = Field(description="The batch-embedding version the vectors came from.")
    source: str = Field(description="What that version embedded (the corpus location).")
    source_digest: str = Field(description="sha256 of the embedded documents, as the embedding version records it.")
    code_version: str = Field(description="Git commit of the factory that built the index.")
    index_code_digest: str = Field(description="Hash of this module (the build code).")
    parent: str | None = Field(default=None, description="The tenant's newest index before this one, if any.")


class IndexManifest(StrictModel):
    format_version: int = Field(default=1, description="Manifest format version.")
    kind: Literal["retrieval-index"] = Field(default="retrieval-index", description="What the version holds.")
    version: str = Field(description="Content-addressed version id (idx-...).")
    created_at: str = Field(description="UTC creation time, ISO 8601.")
    tenant: str = Field(description="The tenant whose documents the index holds; only its requests search it.")
    project: str = Field(default="default", description="Project within the tenant.")
    embedding_model: EmbeddingModelId = Field(description="The model that made the vectors, with its digest.")
    params: IndexParams = Field(description="Index parameters.")
    num_vectors: int = Field(ge=0, description="Vectors (chunks) in the index.")
    files: list[IndexFile] = Field(description="Every file of the version with its checksum.")
    lineage: IndexLineage = Field(description="Where the vectors came from.")

    def file(self, path: str) -> IndexFile:
        return next(f for f in self.files if f.path == path)

    def created_epoch_s(self) -> float:
        import datetime as dt

        return dt.datetime.fromisoformat(self.created_at).timestamp()


class IndexStore(DatasetStore):
    """Index versions under ``<datasets>/indexes``; same atomic publish as datasets and embeddings."""

    prefix = "idx-"
    manifest_cls = IndexManifest
    kind = "retrieval index"

    @staticmethod
    def default_location(home: FactoryHome) -> str:
        return join(home.datasets, "indexes")

    def newest_of(self, tenant: str) -> str | None:
        """The tenant's newest published index version (None: it has none)."""
        mine = [v for v in self.list() if v.manifest.tenant == tenant]
        return mine[-1].version if mine else None


@dataclass(frozen=True)
class Chunk:
    """One indexed passage and where it came from (what a citation names)."""

    doc_id: str
    passage: int
    text: str
    source: str

    @property
    def ref(self) -> str:
        return f"{self.doc_id}#{self.passage}"


@dataclass(frozen=True)
class BuildResult:
    version: str
    manifest: IndexManifest
    cache_hit: bool
    seconds: float

    def summary(self) -> dict:
        return {"version": self.version, "cache_hit": self.cache_hit, "tenant": self.manifest.tenant,
                "vectors": self.manifest.num_vectors, "embedding_version": self.manifest.lineage.embedding_version,
                "model": self.manifest.embedding_model.short(), "seconds": round(self.seconds, 2)}


def index_code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _version(*, embedding_version: str, tenant: str, model: EmbeddingModelId, params: IndexParams) -> str:
    blob = json.dumps({"embeddings": embedding_version, "tenant": tenant, "model_digest": model.digest,
                       "params": params.model_dump(mode="json"), "code": index_code_digest()}, sort_keys=True)
    return "idx-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_faiss_index(vectors, params: IndexParams):
    """A faiss index over ``vectors`` (n x d float32, L2-normalized: inner product is cosine)."""
    import faiss

    dim = int(vectors.shape[1])
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = params.hnsw_ef_search
    else:
        index = faiss.IndexFlatIP(dim)
    if len(vectors):
        index.add(vectors)
    return index


def check_model(where: str, built_with: EmbeddingModelId, serving: EmbeddingModelId) -> None:
    """Raise :class:`EmbeddingModelMismatch` unless both are the same model (name, version, dim and digest)."""
    if built_with != serving:
        raise EmbeddingModelMismatch(where, built_with.short(), serving.short())


def build_index(home: FactoryHome, *, model: EmbeddingModelId, embedding_version: str | None = None,
                tenant: str | None = None, params: IndexParams | None = None, store: IndexStore | None = None,
                log=lambda msg: None) -> BuildResult:
    """Build the index of one embedding version (default: the newest) and publish it.

    ``model`` is the embedding model the vectors must come from (:func:`aifactory.retrieval.model.minilm_identity`
    for the batch-embedding job's): an embedding version whose recorded model differs (name, package version or
    dimension) is refused with :class:`EmbeddingModelMismatch`. ``tenant`` defaults to the embedding version's;
    another tenant's embeddings are refused (:class:`PermissionDenied`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.monotonic()
    params = params or IndexParams()
    store = store or IndexStore(home)
    emb = EmbeddingStore(home).get(embedding_version)
    em = emb.manifest
    tenant = tenant or em.tenant
    if tenant != em.tenant:
        raise PermissionDenied(f"embedding version {emb.version} belongs to tenant {em.tenant!r}; an index for "
                               f"tenant {tenant!r} may hold only that tenant's documents")
    recorded = em.model
    if (recorded.get("name"), str(recorded.get("package_version")), int(recorded.get("dim", 0))) != \
            (model.name, model.package_version, model.dim):
        raise EmbeddingModelMismatch(f"embedding version {emb.version}",
                                     f"{recorded.get('name')}=={recorded.get('package_version')} (dim {recorded.get('dim')})",
                                     model.short())
    version = _version(embedding_version=emb.version, tenant=tenant, model=model, params=params)
    if store.exists(version):
        log(f"index: {version} already published (cache hit)")
        return BuildResult(version, store.get(version).manifest, cache_hit=True, seconds=time.monotonic() - t0)
    emb.validate()  # every shard's checksum and schema before its vectors are trusted
    fs, base = emb.filesystem()
    tables = []
    for shard in em.shards_of(EMBEDDING_SPLIT):
        with fs.open_input_file(join(base, shard.path)) as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables) if tables else None
    n = table.num_rows if table is not None else 0
    if n:
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.ascontiguousarray(flat.reshape(n, model.dim), dtype="float32")
    else:
        vectors = np.zeros((0, model.dim), dtype="float32")
    index = make_faiss_index(vectors, params)
    source = em.source.location.rstrip("/")
    chunks = pa.table({
        "doc_id": table.column("doc_id") if n else pa.array([], pa.string()),
        "passage": table.column("passage") if n else pa.array([], pa.int64()),
        "text": table.column("text") if n else pa.array([], pa.string()),
        "source": pa.array([f"{source}/{d}" for d in (table.column("doc_id").to_pylist() if n else [])], pa.string()),
    })
    parent = store.newest_of(tenant)
    with store.publishing(version) as pending:
        import faiss

        sfs = store.fs
        with sfs.open_output_stream(join(pending.path, INDEX_FILE)) as f:
            f.write(faiss.serialize_index(index).tobytes())
        buf = io.BytesIO()
        pq.write_table(chunks, buf, compression="zstd")
        with sfs.open_output_stream(join(pending.path, CHUNKS_FILE)) as f:
            f.write(buf.getvalue())
        files = [IndexFile(path=p, bytes=sfs.get_file_info(join(pending.path, p)).size,
                           sha256=sha256_file(sfs, join(pending.path, p))) for p in (INDEX_FILE, CHUNKS_FILE)]
        manifest = IndexManifest(
            version=version, created_at=utc_now(), tenant=tenant, project=em.project, embedding_model=model,
            params=params, num_vectors=n, files=files,
            lineage=IndexLineage(embedding_version=emb.version, source=em.source.location, source_digest=em.source.digest,
                                 code_version=str(code_version()), index_code_digest=index_code_digest(),
                                 parent=parent),
        )
        published = pending.commit(manifest)
    log(f"index: published {version} ({n} vectors, {params.kind}) for tenant {tenant!r}")
    return BuildResult(version, published.manifest, cache_hit=pending.raced, seconds=time.monotonic() - t0)


@dataclass
class LoadedIndex:
    """A verified index version in memory: the faiss index and the chunk behind each of its rows."""

    manifest: IndexManifest
    index: object  # faiss.Index
    chunks: list[Chunk]
    location: str

    @property
    def version(self) -> str:
        return self.manifest.version

    def search(self, vector, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest rows to one query vector: (row, cosine score), best first."""
        import numpy as np

        if k <= 0 or not self.chunks:
            return []
        q = np.asarray(vector, dtype="float32").reshape(1, -1)
        scores, ids = self.index.search(q, min(k, len(self.chunks)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def load_index(home: FactoryHome, version: str, *, tenant: str, model: EmbeddingModelId,
               store: IndexStore | None = None) -> LoadedIndex:
    """Load ``version`` for ``tenant``'s requests, encoded by ``model``: refused unless the tenant owns it, it was
    built with that model and every file's sha256 matches the manifest."""
    import faiss
    import numpy as np
    import pyarrow.parquet as pq

    store = store or IndexStore(home)
    v = store.get(version)
    m: IndexManifest = v.manifest
    if m.tenant != tenant:
        raise PermissionDenied(f"index {version} belongs to tenant {m.tenant!r}, not {tenant!r}; a tenant's requests "
                               "search only its own index")
    check_model(f"index {version}", m.embedding_model, model)
    data = {}
    for f in m.files:
        path = join(store.base, version, f.path)
        with store.fs.open_input_stream(path) as fh:
            raw = fh.read()
        actual = hashlib.sha256(raw).hexdigest()
        if actual != f.sha256:
            raise IntegrityError(join(v.location, f.path), f"sha256 {f.sha256[:16]}", f"sha256 {actual[:16]}")
        data[f.path] = raw
    index = faiss.deserialize_index(np.frombuffer(data[INDEX_FILE], dtype="uint8"))
    table = pq.read_table(io.BytesIO(data[CHUNKS_FILE]))
    if index.ntotal != m.num_vectors or table.num_rows != m.num_vectors or (m.num_vectors and index.d != model.dim):
        raise IntegrityError(v.location, f"{m.num_vectors} vectors of dim {model.dim}",
                             f"{index.ntotal} vectors of dim {index.d}, {table.num_rows} chunks")
    if m.params.kind == "hnsw":
        index.hnsw.efSearch = m.params.hnsw_ef_search
    cols = {c: table.column(c).to_pylist() for c in ("doc_id", "passage", "text", "source")}
    chunks = [Chunk(doc_id=d, passage=int(p), text=t, source=s)
              for d, p, t, s in zip(cols["doc_id"], cols["passage"], cols["text"], cols["source"])]
    return LoadedIndex(manifest=m, index=index, chunks=chunks, location=v.location)


def newest_index(home: FactoryHome, tenant: str, *, store: IndexStore | None = None) -> str:
    """The tenant's newest index version, or :class:`NotFound` naming how to build one."""
    store = store or IndexStore(home)
    found = store.newest_of(tenant)
    if found is None:
        raise NotFound("retrieval index", f"(newest of tenant {tenant})",
                       f"the store {store.location} has none for it; build one (aifactory.retrieval.index.build_index)")
    return found
