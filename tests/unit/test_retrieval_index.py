"""The versioned retrieval index: built from an embedding version, published content-addressed and atomically
with lineage, loaded only after its digests, tenant and embedding model check (no Ray)."""

from __future__ import annotations

import os

import pytest

from aifactory.data.store import join
from aifactory.exceptions import EmbeddingModelMismatch, IntegrityError, NotFound, PermissionDenied
from aifactory.home import FactoryHome
from aifactory.retrieval.index import INDEX_FILE, IndexParams, IndexStore, build_index, load_index, newest_index
from tests.unit._retrieval import HASH_MODEL, OTHER_MODEL, encode, publish_embeddings

DOCS = {
    "net/http.py": ["the http client sends a request and reads the response status",
                    "cookies are stored in a jar between requests"],
    "db/sqlite.py": ["a sqlite connection commits a transaction to the database file"],
    "math/stats.py": ["the median and the mean of a list of numbers", "variance measures the spread"],
}


@pytest.fixture
def home(tmp_path):
    return FactoryHome.from_env(tmp_path / "home").ensure()


def top(loaded, query: str, k: int = 1):
    return [loaded.chunks[i] for i, _ in loaded.search(encode([query])[0], k)]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_build_load_and_search_with_lineage(home, kind):
    emb = publish_embeddings(home, DOCS, tenant="search", source="/corpus/stdlib")
    built = build_index(home, model=HASH_MODEL, embedding_version=emb, params=IndexParams(kind=kind))
    m = built.manifest
    assert m.tenant == "search" and m.num_vectors == 5
    assert m.lineage.embedding_version == emb and m.lineage.source == "/corpus/stdlib"
    assert m.embedding_model.digest == HASH_MODEL.digest
    assert {f.path for f in m.files} == {"index.faiss", "chunks.parquet"} and all(len(f.sha256) == 64 for f in m.files)
    loaded = load_index(home, built.version, tenant="search", model=HASH_MODEL)
    (hit,) = top(loaded, "commit the sqlite transaction")
    assert hit.doc_id == "db/sqlite.py" and hit.passage == 0
    assert hit.source == "/corpus/stdlib/db/sqlite.py"
    assert top(loaded, "cookies jar")[0].ref == "net/http.py#1"


def test_rebuild_is_a_cache_hit_and_the_version_is_content_addressed(home):
    emb = publish_embeddings(home, DOCS, tenant="search")
    first = build_index(home, model=HASH_MODEL, embedding_version=emb)
    again = build_index(home, model=HASH_MODEL, embedding_version=emb)
    assert again.cache_hit and again.version == first.version
    hnsw = build_index(home, model=HASH_MODEL, embedding_version=emb, params=IndexParams(kind="hnsw"))
    assert hnsw.version != first.version
    emb2 = publish_embeddings(home, {**DOCS, "new.py": ["a new document"]}, tenant="search")
    second = build_index(home, model=HASH_MODEL, embedding_version=emb2)
    assert second.version != first.version
    assert second.manifest.lineage.parent == hnsw.version  # the tenant's newest before it
    assert newest_index(home, "search") == second.version


def test_a_failed_build_leaves_no_visible_version(home, monkeypatch):
    emb = publish_embeddings(home, DOCS, tenant="search")
    import aifactory.retrieval.index as index_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(index_mod, "sha256_file", boom)
    with pytest.raises(OSError, match="disk full"):
        build_index(home, model=HASH_MODEL, embedding_version=emb)
    store = IndexStore(home)
    assert store.list() == []
    assert not [n for n in os.listdir(store.base)]  # the hidden temp directory was removed too
    with pytest.raises(NotFound, match="has none for it"):
        newest_index(home, "search")


def test_a_tampered_file_is_refused_at_load(home):
    emb = publish_embeddings(home, DOCS, tenant="search")
    built = build_index(home, model=HASH_MODEL, embedding_version=emb)
    path = join(IndexStore(home).base, built.version, INDEX_FILE)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(IntegrityError, match="index.faiss: integrity check failed"):
        load_index(home, built.version, tenant="search", model=HASH_MODEL)


def test_loading_with_another_embedding_model_is_a_clear_error(home):
    emb = publish_embeddings(home, DOCS, tenant="search")
    built = build_index(home, model=HASH_MODEL, embedding_version=emb)
    with pytest.raises(EmbeddingModelMismatch, match=f"index {built.version}: built with embedding model "
                                                     r"test/hash-words==1 \(dim 384, sha256 000000000000\)"):
        load_index(home, built.version, tenant="search", model=OTHER_MODEL)


def test_building_from_another_models_embeddings_is_refused(home):
    emb = publish_embeddings(home, DOCS, tenant="search")
    other = HASH_MODEL.model_copy(update={"name": "sentence-transformers/all-MiniLM-L6-v2"})
    with pytest.raises(EmbeddingModelMismatch, match=f"embedding version {emb}"):
        build_index(home, model=other, embedding_version=emb)


def test_an_index_serves_only_its_own_tenant(home):
    emb = publish_embeddings(home, DOCS, tenant="search")
    built = build_index(home, model=HASH_MODEL, embedding_version=emb)
    with pytest.raises(PermissionDenied, match="belongs to tenant 'search', not 'ads'"):
        load_index(home, built.version, tenant="ads", model=HASH_MODEL)
    with pytest.raises(PermissionDenied, match="belongs to tenant 'search'"):
        build_index(home, model=HASH_MODEL, embedding_version=emb, tenant="ads")


def test_errors_pickle():
    import pickle

    err = EmbeddingModelMismatch("index idx-1", "a", "b")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
