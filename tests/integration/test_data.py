"""The data plane on the shared real cluster: Ray Data ingest, the CLI, the feed, batch embeddings.

Every test writes to its own dataset store (``AIFACTORY_DATASETS_URI`` / ``DatasetStore(location=...)``)
so the session's default store, which other components' tests read, never sees these small datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aifactory.data.embed import EmbedConfig, EmbeddingStore, run_batch_embed
from aifactory.data.feed import WaitMeter, iter_token_batches, read_deterministic, read_split
from aifactory.data.ingest import IngestConfig, ingest
from aifactory.data.store import DatasetStore
from aifactory.exceptions import ContractViolation
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef
from tests.integration.conftest import run_factory
from tests.unit.test_data_store import snapshot, write_corpus

TENANT = TenantRef(tenant="search")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "src", n=80)


@pytest.fixture(scope="module")
def ingested(ray_driver, corpus, tmp_path_factory):
    """One real Ray Data ingest, shared by the feed tests."""
    store = DatasetStore(FactoryHome.from_env(), location=str(tmp_path_factory.mktemp("ds")))
    cfg = IngestConfig(source=str(corpus), seq_len=64, target_shard_mb=0.04, validation_fraction=0.2)
    return store, cfg, ingest(store.home, cfg, tenant=TENANT, store=store)


def test_ray_data_ingest_is_versioned_and_a_rerun_is_a_cache_hit(ingested):
    store, cfg, first = ingested
    m = first.dataset.manifest
    assert not first.cache_hit and m.source.num_files == 80 and len(m.shards_of("train")) >= 2
    assert m.splits["train"].rows > 0 and m.splits["validation"].rows > 0
    assert store.verify(first.version) == []
    before = snapshot(Path(store.location))
    again = ingest(store.home, cfg, tenant=TENANT, store=store)
    assert again.cache_hit and again.version == first.version
    assert snapshot(Path(store.location)) == before


def test_feed_streams_int64_batches_and_deterministic_mode_repeats(ingested):
    _, _, res = ingested
    v = res.dataset
    meter = WaitMeter()
    rows = 0
    for batch in meter.track(iter_token_batches(read_split(v, "train"), batch_size=32, prefetch_batches=2)):
        assert batch.shape == (32, 64) and str(batch.dtype) == "torch.int64"
        assert int(batch.max()) < 259
        rows += batch.shape[0]
    assert rows == (v.manifest.splits["train"].rows // 32) * 32  # drop_last, nothing skipped
    s = meter.summary()
    assert s["steps"] == rows // 32 and 0.0 <= s["data_wait_fraction"] <= 1.0

    def order(epoch, rank):
        ds = read_deterministic(v, "train", rank=rank, world_size=2, seed=5, epoch=epoch)
        return [b[:, :8].tolist() for b, _ in iter_token_batches(ds, batch_size=16, drop_last=False)]

    # (that a new epoch reorders the files is unit-tested on deterministic_files: no cluster time here)
    a = order(0, 0)
    assert a == order(0, 0)  # same seed/epoch/rank: row-for-row identical
    total = sum(len(b) for b in a + order(0, 1))
    assert total == v.manifest.splits["train"].rows  # the two ranks cover the split exactly once


def test_reading_refuses_a_corrupt_shard(ingested):
    _, _, res = ingested
    v = res.dataset
    path = Path(v.files("validation")[0])
    original = path.read_bytes()
    try:
        path.write_bytes(original[: len(original) // 2])
        with pytest.raises(ContractViolation) as info:
            read_split(v, "validation")
        assert str(path) in str(info.value) and info.value.rule == "shard.size"
    finally:
        path.write_bytes(original)


def test_cli_ingest_datasets_and_verify(factory_cluster, corpus, tmp_path):
    env = factory_cluster.env()
    env["AIFACTORY_DATASETS_URI"] = str(tmp_path / "cli-datasets")
    out = run_factory("ingest", str(corpus), "--seq-len", "64", "--target-shard-mb", "0.01", "--tenant", "search",
                      "--format", "json", env=env, timeout=300)
    first = json.loads(out.stdout)
    assert first["version"].startswith("ds-") and first["cache_hit"] is False
    assert Path(first["manifest"]).is_file() and "using the cluster at" in out.stderr  # not an embedded one
    again = json.loads(run_factory("ingest", str(corpus), "--seq-len", "64", "--target-shard-mb", "0.01",
                                   "--format", "json", env=env, timeout=300).stdout)
    assert again["version"] == first["version"] and again["cache_hit"] is True

    listed = json.loads(run_factory("datasets", "--format", "json", env=env).stdout)
    assert [d["version"] for d in listed] == [first["version"]] and listed[0]["tenant"] == "search"
    assert listed[0]["train_rows"] == first["train_rows"] and listed[0]["mb"] > 0
    ok = run_factory("datasets", "verify", first["version"], env=env)
    assert "ok" in ok.stdout

    shard = Path(first["manifest"]).parent / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    (Path(first["manifest"]).parent / "validation" / "part-00000.parquet").unlink()
    bad = run_factory("datasets", "verify", first["version"], env=env, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"{shard}: contract rule 'shard.checksum'" in bad.stderr
    assert "validation/part-00000.parquet: contract rule 'shard.present'" in bad.stderr

    missing = run_factory("datasets", "verify", "ds-0000000000000000", env=env, check=False)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    bad_dir = run_factory("ingest", str(tmp_path / "nope"), env=env, check=False)
    assert bad_dir.returncode == 2 and "SOURCE_DIR" in bad_dir.stderr and "Traceback" not in bad_dir.stderr


def test_batch_embeddings_with_the_real_minilm(ray_driver, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Ray Data streams batches to an actor pool.\n\nEach actor loads the model once.")
    (docs / "b.txt").write_text("The cat sat on the mat.\n\nA kitten was sitting on the rug.")
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    cfg = EmbedConfig(source=str(docs), max_docs=2, chunk_chars=50, batch_size=4)
    res = run_batch_embed(home, cfg, tenant=TENANT)
    m = res.dataset.manifest
    assert not res.cache_hit and m.tenant == "search" and m.splits["embeddings"].rows == 4 and m.model["dim"] == 384
    assert EmbeddingStore(home).verify(res.dataset.version) == []
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(res.dataset.files("embeddings")).sort_by([("doc_id", "ascending"), ("passage", "ascending")])
    vecs = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert vecs.shape == (4, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    # a real pretrained model: the two cat sentences are closer to each other than to the Ray sentence
    sim = vecs @ vecs.T
    assert sim[2, 3] > sim[0, 2] + 0.2 and sim[2, 3] > sim[0, 3] + 0.2
    assert run_batch_embed(home, cfg, tenant=TENANT).cache_hit
