"""Tiny real things for the retrieval tests: a deterministic hashing encoder and published embedding versions.

The encoder maps a text to the normalized sum of one random unit vector per lowercase word, so a query shares
its nearest chunk with the words it shares; the versions are written through the real EmbeddingStore (the
batch-embedding job's layout, manifest and checksums), only the vectors come from this encoder, not MiniLM.
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np

from aifactory.data.contract import sha256_file
from aifactory.data.embed import SPLIT, EmbeddingManifest, EmbeddingStore, embedding_contract
from aifactory.data.manifest import ShardInfo, SourceInfo, SplitStats, utc_now
from aifactory.data.store import join
from aifactory.retrieval.model import EmbeddingModelId

DIM = 384
HASH_MODEL = EmbeddingModelId(name="test/hash-words", package_version="1", dim=DIM, digest="0" * 64)
OTHER_MODEL = EmbeddingModelId(name="test/hash-words", package_version="1", dim=DIM, digest="f" * 64)


def _word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype("float32")
    return v / np.linalg.norm(v)


def encode(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), DIM), dtype="float32")
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z0-9]+", t.lower()):
            out[i] += _word_vector(w)
        n = np.linalg.norm(out[i])
        out[i] = out[i] / n if n else _word_vector("<empty>")
    return out


def publish_embeddings(home, docs: dict[str, list[str]], *, tenant: str, model: EmbeddingModelId = HASH_MODEL,
                       source: str = "/corpus") -> str:
    """Publish ``{doc_id: [passage text, ...]}`` as an embedding version of ``tenant``; returns its version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(d, i, t) for d, ps in docs.items() for i, t in enumerate(ps)]
    vecs = encode([t for _, _, t in rows])
    store = EmbeddingStore(home)
    digest = hashlib.sha256(repr(sorted(docs.items())).encode() + tenant.encode()).hexdigest()
    version = "emb-" + digest[:16]
    table = pa.table({
        "doc_id": pa.array([r[0] for r in rows], pa.string()),
        "passage": pa.array([r[1] for r in rows], pa.int64()),
        "text": pa.array([r[2] for r in rows], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), DIM),
    })
    with store.publishing(version) as pending:
        rel = f"{SPLIT}/part-00000.parquet"
        store.fs.create_dir(join(pending.path, SPLIT), recursive=True)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        with store.fs.open_output_stream(join(pending.path, rel)) as f:
            f.write(buf.getvalue())
        shard = ShardInfo(path=rel, split=SPLIT, rows=len(rows), tokens=0,
                          bytes=store.fs.get_file_info(join(pending.path, rel)).size,
                          sha256=sha256_file(store.fs, join(pending.path, rel)))
        manifest = EmbeddingManifest(
            version=version, created_at=utc_now(), tenant=tenant,
            model={"name": model.name, "package": "test", "package_version": model.package_version, "dim": model.dim},
            params={}, code_version="test", source=SourceInfo(location=source, num_files=len(docs), bytes=0, digest=digest),
            splits={SPLIT: SplitStats(rows=len(rows), tokens=0, documents=len(docs), shards=1, token_histogram=[])},
            shards=[shard], contract=embedding_contract())
        pending.commit(manifest)
    return version
