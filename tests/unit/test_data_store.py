"""Dataset versions without Ray: content addressing, cache hits, atomic publish, every contract rule.

Shards are written by the single-process pyarrow writer (same layout and schema as the Ray Data writer,
which tests/integration/test_data.py exercises).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifactory.data.contract import check_drift, tv_distance
from aifactory.data.feed import deterministic_files
from aifactory.data.ingest import IngestConfig, collect_source, ingest, local_writer
from aifactory.data.manifest import DriftBounds
from aifactory.data.staging import stage_locally
from aifactory.data.store import DatasetStore
from aifactory.exceptions import ContractViolation, DataError, NotFound
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef

TENANT = TenantRef(tenant="search")


def write_corpus(root: Path, n: int = 40, *, salt: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "\n".join(f"def f_{i}_{j}(x):  # {salt} line {j}\n    return x * {j} + {i}" for j in range(20 + i % 7))
        (root / f"mod_{i:03d}.py").write_text(body)
    (root / "blob.bin.py").write_bytes(b"\x00\x01binary")  # skipped: not text
    return root


@pytest.fixture()
def home(tmp_path) -> FactoryHome:
    return FactoryHome.from_env(tmp_path / "factory").ensure()


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


def cfg(corpus: Path, **kw) -> IngestConfig:
    return IngestConfig(source=str(corpus), seq_len=64, target_shard_mb=0.004, validation_fraction=0.2, **kw)


def run(home, config, *, writer=local_writer):
    return ingest(home, config, tenant=TENANT, writer=writer)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_ingest_publishes_a_complete_manifest(home, corpus):
    res = run(home, cfg(corpus))
    v = res.dataset
    m = v.manifest
    assert not res.cache_hit and v.version.startswith("ds-") and m.seq_len == 64 and m.vocab_size == 259
    assert m.source.num_files == 40 and m.tenant == "search"  # the binary file was skipped
    assert m.contract.columns[0].dtype == "fixed_size_list<uint16>[64]" and m.contract.null_policy == "forbid"
    assert len(m.shards_of("train")) > 1 and m.splits["validation"].rows > 0
    for split, stats in m.splits.items():
        shards = m.shards_of(split)
        assert stats.rows == sum(s.rows for s in shards) and stats.tokens == sum(s.tokens for s in shards)
        assert sum(stats.token_histogram) == stats.rows * 64
    files = v.files("train")
    assert all(Path(f).is_file() for f in files)
    t = pq.read_table(files[0])
    assert t.schema.field("tokens").type == pa.list_(pa.uint16(), 64)
    assert m.lineage.params["seq_len"] == 64 and m.lineage.parent is None and m.lineage.code_version
    assert DatasetStore(home).verify(v.version) == []
    # no document is in both splits, and the split matches a fresh computation
    assert m.splits["train"].documents + m.splits["validation"].documents == 40


def test_unchanged_input_is_a_cache_hit_that_rewrites_nothing(home, corpus):
    first = run(home, cfg(corpus))
    root = Path(home.datasets)
    before = snapshot(root)
    second = run(home, cfg(corpus))
    assert second.cache_hit and second.version == first.version
    assert snapshot(root) == before  # same inodes, same mtimes: no shard or manifest rewritten
    assert [v.version for v in DatasetStore(home).list()] == [first.version]


def test_version_changes_with_content_params_but_not_with_tenant(home, corpus, tmp_path):
    v1 = run(home, cfg(corpus)).version
    assert ingest(home, cfg(corpus), tenant=TenantRef(tenant="ads"), writer=local_writer).version == v1
    assert run(home, cfg(corpus, seed=3)).version != v1
    assert run(home, cfg(corpus).model_copy(update={"seq_len": 32})).version != v1
    (corpus / "mod_000.py").write_text("changed content")
    v2 = run(home, cfg(corpus))
    assert v2.version != v1 and v2.dataset.manifest.lineage.parent == v1  # same source + params: lineage
    assert DatasetStore(home).get().version == v2.version  # newest
    with pytest.raises(NotFound, match="ds-nope"):
        DatasetStore(home).get("ds-nope")


def test_max_mb_caps_the_source(corpus):
    full = collect_source(str(corpus))
    capped = collect_source(str(corpus), max_bytes=full.bytes // 4)
    assert 0 < capped.bytes <= full.bytes // 4 and len(capped.documents) < len(full.documents)
    with pytest.raises(DataError, match="not a directory"):
        collect_source(str(corpus / "missing"))


def test_failed_ingest_leaves_no_visible_version(home, corpus):
    def failing_writer(by_split, *, fs, out, seq_len, rows_per_file):
        local_writer(by_split, fs=fs, out=out, seq_len=seq_len, rows_per_file=rows_per_file)
        raise RuntimeError("worker lost half way")

    with pytest.raises(RuntimeError):
        run(home, cfg(corpus), writer=failing_writer)
    assert DatasetStore(home).list() == []
    assert list(Path(home.datasets).iterdir()) == []  # the partial output was removed


def test_killed_ingest_leaves_no_visible_version(home, corpus):
    script = textwrap.dedent(f"""
        import os, signal
        from aifactory.data.ingest import IngestConfig, ingest, local_writer
        from aifactory.home import FactoryHome
        from aifactory.tenancy import TenantRef

        def dying_writer(by_split, *, fs, out, seq_len, rows_per_file):
            local_writer(by_split, fs=fs, out=out, seq_len=seq_len, rows_per_file=rows_per_file)
            os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: like an OOM kill

        cfg = IngestConfig(source={str(corpus)!r}, seq_len=64, target_shard_mb=0.004, validation_fraction=0.2)
        ingest(FactoryHome.from_env({str(home.root)!r}), cfg, tenant=TenantRef(tenant="search"), writer=dying_writer)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    store = DatasetStore(home)
    assert store.list() == []
    leftovers = [p.name for p in Path(home.datasets).iterdir()]
    assert leftovers and all(n.startswith(".tmp-") for n in leftovers)  # hidden, never listed
    # the next ingest publishes normally, and the stale temp dir can be cleaned
    assert not run(home, cfg(corpus)).cache_hit
    assert store.remove_stale_temp() == leftovers and len(store.list()) == 1


# ---- contract violations: each names the file and the rule -------------------------------------------------

@pytest.fixture()
def published(home, corpus):
    return run(home, cfg(corpus)).dataset


def rules_of(problems):
    return {(Path(p.path).name, p.rule) for p in problems}


def test_truncated_shard(home, published):
    path = Path(published.files("train")[1])
    path.write_bytes(path.read_bytes()[:-40])
    problems = DatasetStore(home).verify(published.version)
    assert {("part-00001.parquet", "shard.size"), ("part-00001.parquet", "shard.checksum"),
            ("part-00001.parquet", "shard.readable")} <= rules_of(problems)
    with pytest.raises(ContractViolation) as info:
        published.validate(splits=["train"])
    assert str(path) in str(info.value) and "shard.size" in str(info.value) and "truncated" in str(info.value)


def test_corrupt_shard_same_size_fails_the_checksum(home, published):
    path = Path(published.files("train")[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = DatasetStore(home).verify(published.version)
    assert ("part-00000.parquet", "shard.checksum") in rules_of(problems)
    assert ("part-00000.parquet", "shard.size") not in rules_of(problems)
    with pytest.raises(ContractViolation, match=r"part-00000.parquet: contract rule 'shard.checksum'"):
        published.validate()


def test_missing_shard(home, published):
    path = Path(published.files("validation")[0])
    path.unlink()
    assert rules_of(DatasetStore(home).verify(published.version)) == {(path.name, "shard.present")}
    with pytest.raises(ContractViolation, match="shard.present"):
        published.validate(splits=["validation"])
    published.validate(splits=["train"])  # the other split is intact and readable


def _rewrite(path: Path, table: pa.Table, manifest_path: Path, rel: str) -> None:
    """Replace a shard and fix its size/checksum in the manifest, so only the schema rule can fire."""
    import hashlib

    pq.write_table(table, path)
    m = json.loads(manifest_path.read_text())
    for s in m["shards"]:
        if s["path"] == rel:
            s["bytes"] = path.stat().st_size
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(m))


def test_schema_drift_dtype_and_columns(home, published):
    store = DatasetStore(home)
    path = Path(published.files("train")[0])
    rows = pq.read_table(path).num_rows
    wide = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array([1] * rows * 64, pa.int32()), 64)})
    _rewrite(path, wide, Path(published.manifest_path), "train/part-00000.parquet")
    problems = store.verify(published.version)
    assert rules_of(problems) == {("part-00000.parquet", "schema.dtype")}
    assert "fixed_size_list<int32>[64]" in str(problems[0]) and "fixed_size_list<uint16>[64]" in str(problems[0])

    second = Path(published.files("train")[1])
    table = pq.read_table(second)
    extra = table.append_column("doc", pa.array(["x"] * table.num_rows))
    _rewrite(second, extra, Path(published.manifest_path), "train/part-00001.parquet")
    assert ("part-00001.parquet", "schema.columns") in rules_of(store.verify(published.version))


def test_row_count_nulls_and_token_range(home, published):
    store = DatasetStore(home)
    path = Path(published.files("train")[0])
    table = pq.read_table(path)
    _rewrite(path, table.slice(0, table.num_rows - 1), Path(published.manifest_path), "train/part-00000.parquet")
    assert ("part-00000.parquet", "shard.rows") in rules_of(store.verify(published.version))

    n = table.num_rows
    values = pa.array([300] * (n * 64), pa.uint16())  # ids past the vocabulary
    bad = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, 64)})
    _rewrite(path, bad, Path(published.manifest_path), "train/part-00000.parquet")
    assert ("part-00000.parquet", "tokens.range") in rules_of(store.verify(published.version))

    nulls = pa.table({"tokens": pa.array([None] * n, pa.list_(pa.uint16(), 64))})
    _rewrite(path, nulls, Path(published.manifest_path), "train/part-00000.parquet")
    assert ("part-00000.parquet", "nulls") in rules_of(store.verify(published.version))


def test_manifest_totals_and_unreadable_manifest(home, published):
    mpath = Path(published.manifest_path)
    m = json.loads(mpath.read_text())
    m["splits"]["train"]["rows"] += 5
    mpath.write_text(json.dumps(m))
    assert ("manifest.json", "manifest.totals") in rules_of(DatasetStore(home).verify(published.version))
    mpath.write_text("{not json")
    with pytest.raises(ContractViolation, match="manifest.readable"):
        DatasetStore(home).get(published.version)


def test_drift_bounds_against_the_parent(home, corpus):
    parent = run(home, cfg(corpus)).dataset
    for p in list(corpus.glob("mod_*.py"))[:30]:  # the source shrinks to a quarter
        p.unlink()
    with pytest.raises(ContractViolation) as info:
        run(home, cfg(corpus))
    assert info.value.rule == "drift.rows" and "nothing was published" in str(info.value)
    assert [v.version for v in DatasetStore(home).list()] == [parent.version]
    child = run(home, cfg(corpus, allow_drift=True)).dataset  # an explicit decision publishes it
    assert child.manifest.lineage.parent == parent.version
    problems = DatasetStore(home).verify(child.version)
    assert {p.rule for p in problems} >= {"drift.rows"} and all(p.path == child.manifest_path for p in problems)


def test_token_distribution_drift_rule(home, corpus):
    parent = run(home, cfg(corpus)).dataset.manifest
    skewed = parent.model_copy(deep=True)
    hist = skewed.splits["train"].token_histogram
    skewed.splits["train"].token_histogram = [0] * len(hist)
    skewed.splits["train"].token_histogram[ord("z")] = sum(hist)
    problems = check_drift(skewed, parent, where="m.json")
    assert [p.rule for p in problems] == ["drift.tokens"] and "train" in problems[0].detail
    loose = skewed.model_copy(update={"contract": skewed.contract.model_copy(update={"drift": DriftBounds(max_token_tv_distance=1.0)})})
    assert check_drift(loose, parent, where="m.json") == []
    assert tv_distance([1, 0], [1, 0]) == 0.0 and tv_distance([1, 0], [0, 1]) == 1.0


def test_deterministic_file_assignment():
    files = [f"f{i}" for i in range(10)]
    r0 = deterministic_files(files, rank=0, world_size=3, seed=7, epoch=0)
    assert r0 == deterministic_files(files, rank=0, world_size=3, seed=7, epoch=0)
    parts = [deterministic_files(files, rank=r, world_size=3, seed=7, epoch=0) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(files) and not set(parts[0]) & set(parts[1])
    assert deterministic_files(files, rank=0, world_size=1, seed=7, epoch=1) != deterministic_files(files, rank=0, world_size=1, seed=7, epoch=0)
    with pytest.raises(ValueError):
        deterministic_files(files, rank=3, world_size=3, seed=0, epoch=0)


def test_remote_store_uri_and_staging_cache(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("AIFACTORY_DATASETS_URI", f"file://{tmp_path}/remote-datasets")
    home = FactoryHome.from_env(tmp_path / "h").ensure()
    v = run(home, cfg(corpus)).dataset
    assert v.location.startswith("file://") and all(f.startswith("file://") for f in v.files("train"))
    assert DatasetStore(home).verify(v.version) == []
    cache = tmp_path / "cache"
    local = stage_locally(v, "train", cache)
    assert len(local) == len(v.files("train")) and all(Path(p).is_file() for p in local)
    before = snapshot(cache)
    assert stage_locally(v, "train", cache) == local and snapshot(cache) == before  # reused, not re-copied
    # a corrupt remote shard is refused while staging, naming the remote file and the rule
    remote = Path(v.files("validation")[0].removeprefix("file://"))
    remote.write_bytes(b"garbage" + remote.read_bytes()[7:])
    with pytest.raises(ContractViolation, match=r"validation/part-00000.parquet: contract rule 'shard.checksum'"):
        stage_locally(v, "validation", cache)
    assert not any(cache.rglob("validation/*.parquet"))


def test_ingest_goes_through_the_front_door(home, corpus):
    """Admitted against the tenant's quota by what it declares (packing tasks x 0.5 CPU), recorded as an
    ingest run; refused before anything is written when it does not fit."""
    from aifactory.cost.budgets import BudgetsConfig, save_budgets
    from aifactory.cost.ledger import Ledger
    from aifactory.exceptions import QuotaExceeded
    from aifactory.workloads import list_records

    assert cfg(corpus).resources().cpu == 2.0  # 4 tasks x 0.5 CPU by default
    save_budgets(home, BudgetsConfig.model_validate({"tenants": {"search": {"quota": {"cpu": 1}}}}))
    Ledger.of(home).set_live("c1", {("search", "cpu"): 0.0})  # a fresh meter that sees nothing held
    before = snapshot(home.root / "datasets") if (home.root / "datasets").exists() else {}
    with pytest.raises(QuotaExceeded, match="resource='CPU', requested=2"):
        run(home, cfg(corpus))
    after = snapshot(home.root / "datasets") if (home.root / "datasets").exists() else {}
    assert after == before and DatasetStore(home).list() == []
    result = run(home, cfg(corpus, max_tasks=2))  # 1 CPU fits
    (rec,) = [r for r in list_records(home) if r.workload.kind.value == "ingest"]
    assert rec.status == "succeeded" and rec.refs["dataset_version"] == result.version
