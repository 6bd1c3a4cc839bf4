"""Ingest: a directory of text files -> a content-addressed, contract-checked dataset version.

Steps: collect the source (sorted, capped by ``max_mb``), hash it into a version id, return at once if
that version exists (a cache hit writes nothing), else tokenize + pack + split by document and write
pre-sharded Parquet in parallel with Ray Data (:func:`ray_writer`) into a hidden place, compute per-shard
stats and checksums, check drift against the parent, write the manifest and publish atomically.

The version id hashes the source files' contents, the tokenizer, the packing parameters and the ingest
code itself (:func:`ingest_code_digest`), so changing any of them makes a new version and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.data.contract import check_drift, sha256_file
from aifactory.data.manifest import (
    DatasetManifest, DriftBounds, Lineage, ShardInfo, SourceInfo, SplitStats, token_column_type, tokens_contract,
    utc_now,
)
from aifactory.data.packing import SPLITS, count_tokens, pack_documents, split_of, token_histogram
from aifactory.data.store import VERSION_PREFIX, DatasetStore, DatasetVersion, Pending, join
from aifactory.data.tokenizer import ByteTokenizer
from aifactory.exceptions import ContractViolation, DataError
from aifactory.home import FactoryHome, filesystem
from aifactory.provenance import code_version
from aifactory.tenancy import TenantRef

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".toml", ".cfg", ".ini", ".html", ".css", ".js", ".c", ".h")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git", "node_modules"}


PACK_TASK_CPUS = 0.5


class IngestConfig(StrictModel):
    source: str | None = Field(default=None, description="Directory (path or URI) of text files; default: Python's stdlib source tree.")
    seq_len: int = Field(default=256, ge=8, le=65536, description="Tokens per packed row.")
    max_mb: float | None = Field(default=None, gt=0, description="Ingest at most this many MB of source (files in sorted order).")
    target_shard_mb: float = Field(default=1.0, gt=0, description="Target uncompressed size of each Parquet shard.")
    validation_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of documents held out for validation.")
    seed: int = Field(default=0, description="Seed of the document split.")
    suffixes: list[str] = Field(default_factory=lambda: list(TEXT_SUFFIXES), description="File suffixes that count as text.")
    drift: DriftBounds = Field(default_factory=DriftBounds, description="Allowed drift against the parent version.")
    allow_drift: bool = Field(default=False, description="Publish even if drift bounds against the parent are broken.")
    max_tasks: int = Field(default=4, ge=1, le=256, description="Packing tasks at once (each holds 0.5 CPU): what the "
                                                                "ingest holds, and what admission counts.")

    def resources(self):
        """What the ingest holds at once: ``max_tasks`` packing tasks of 0.5 CPU (the driver's own reads and
        checksums run in its threads)."""
        from aifactory.workloads.spec import Resources

        return Resources.per_unit(self.max_tasks, cpu=PACK_TASK_CPUS)

    def params(self) -> dict[str, Any]:
        """The parameters that shape the output (and so enter the version id)."""
        return {"seq_len": self.seq_len, "target_shard_mb": self.target_shard_mb,
                "validation_fraction": self.validation_fraction, "seed": self.seed, "suffixes": sorted(self.suffixes)}


@dataclass(frozen=True)
class Document:
    doc_id: str  # path relative to the source root
    text: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SourcePlan:
    location: str
    documents: list[Document]
    digest: str
    max_bytes: int | None

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.documents)


@dataclass(frozen=True)
class IngestResult:
    dataset: DatasetVersion
    cache_hit: bool
    seconds: float

    @property
    def version(self) -> str:
        return self.dataset.version

    def summary(self) -> dict[str, Any]:
        m = self.dataset.manifest
        return {"version": self.version, "cache_hit": self.cache_hit, "manifest": self.dataset.manifest_path,
                "seq_len": m.seq_len, "files": m.source.num_files, "source_mb": round(m.source.bytes / 1e6, 2),
                **{f"{s}_rows": st.rows for s, st in m.splits.items()},
                **{f"{s}_tokens": st.tokens for s, st in m.splits.items()},
                "shards": len(m.shards), "seconds": round(self.seconds, 1)}


def default_source() -> str:
    return sysconfig.get_paths()["stdlib"]


def collect_source(location: str, *, max_bytes: int | None = None, suffixes: Sequence[str] = TEXT_SUFFIXES) -> SourcePlan:
    """Text files under ``location`` in sorted order, up to ``max_bytes``; binary (NUL-containing) files are skipped."""
    import pyarrow.fs as pafs

    fs, base = filesystem(location)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{location}: not a directory of text files")
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted(
        (e for e in entries if e.type == pafs.FileType.File and e.path.endswith(tuple(suffixes))
         and not _SKIP_DIRS.intersection(e.path[len(base):].split("/"))),
        key=lambda e: e.path,
    )
    docs: list[Document] = []
    total = 0
    for e in files:
        if max_bytes is not None and total + e.size > max_bytes and docs:
            continue  # keep filling with smaller files: the cap is a budget, not a cut-off point
        with fs.open_input_stream(e.path) as f:
            raw = f.read()
        if b"\x00" in raw or not raw.strip():
            continue
        docs.append(Document(doc_id=e.path[len(base):].lstrip("/"), text=raw.decode("utf-8", errors="replace"),
                             sha256=hashlib.sha256(raw).hexdigest(), size=len(raw)))
        total += len(raw)
    if not docs:
        raise DataError(f"{location}: no text files ({', '.join(suffixes)}) found" + (f" under {max_bytes} bytes" if max_bytes else ""))
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.doc_id}\0{d.sha256}\n".encode())
    return SourcePlan(location=location, documents=docs, digest=h.hexdigest(), max_bytes=max_bytes)


def ingest_code_digest() -> str:
    """Hash of the modules whose behaviour shapes the shards: a code change makes a new version."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("tokenizer.py", "packing.py", "ingest.py", "manifest.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def version_id(plan: SourcePlan, cfg: IngestConfig, tokenizer: ByteTokenizer) -> str:
    blob = json.dumps({"source": plan.digest, "tokenizer": tokenizer.spec(), "params": cfg.params(),
                       "code": ingest_code_digest()}, sort_keys=True)
    return VERSION_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_documents(docs: Sequence[Document], cfg: IngestConfig) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.doc_id, validation_fraction=cfg.validation_fraction, seed=cfg.seed)].append(d)
    if cfg.validation_fraction > 0 and not out["validation"] and len(docs) > 1:
        out["validation"].append(out["train"].pop())  # a tiny corpus still gets a validation split
    return out


def rows_per_shard(cfg: IngestConfig) -> int:
    return max(1, int(cfg.target_shard_mb * 1e6 // (cfg.seq_len * 2)))


def pack_table(texts: Sequence[str], seq_len: int):
    """A pyarrow table with one ``tokens: fixed_size_list<uint16>[seq_len]`` column."""
    import pyarrow as pa

    rows = pack_documents(texts, seq_len=seq_len)
    flat = pa.array(rows.reshape(-1), type=pa.uint16())
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, seq_len)})


# A writer puts split/<any>.parquet files under `out` (an fs path of `fs`); names are normalised afterwards.
Writer = Callable[..., None]


def local_writer(docs_by_split: dict[str, list[Document]], *, fs, out: str, seq_len: int, rows_per_file: int) -> None:
    """Single-process pyarrow writer (tests, tiny inputs): same layout and schema as :func:`ray_writer`."""
    import pyarrow.parquet as pq

    for split, docs in docs_by_split.items():
        fs.create_dir(join(out, split), recursive=True)
        table = pack_table([d.text for d in docs], seq_len)
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
            with fs.open_output_stream(join(out, split, f"w-{i:05d}.parquet")) as f:
                pq.write_table(table.slice(start, rows_per_file), f, compression="zstd")


def _pack_batch(batch, *, seq_len: int):
    return pack_table([str(t) for t in batch["text"].to_pylist()], seq_len)


def ray_writer(docs_by_split: dict[str, list[Document]], *, fs, out: str, seq_len: int, rows_per_file: int,
               max_tasks: int | None = None) -> None:
    """Tokenize and pack in parallel Ray Data tasks (at most ``max_tasks`` at once, as the ingest declared)
    and write pre-sharded Parquet (zstd)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # same input -> same shard contents, run after run
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 2)))
    try:
        for split, docs in docs_by_split.items():
            if not docs:
                continue
            blocks = max(1, min(len(docs), 2 * num_cpus))
            ds = ray.data.from_items([{"text": d.text} for d in docs], override_num_blocks=blocks)
            ds = ds.map_batches(_pack_batch, fn_kwargs={"seq_len": seq_len}, batch_format="pyarrow",
                                batch_size=max(1, -(-len(docs) // blocks)), num_cpus=PACK_TASK_CPUS,
                                concurrency=max_tasks)
            ds.write_parquet(join(out, split), filesystem=fs, min_rows_per_file=rows_per_file,
                             max_rows_per_file=rows_per_file, compression="zstd")
    finally:
        ctx.execution_options.preserve_order = saved


def shard_stats(location: str, rel: str, split: str, vocab_size: int) -> tuple[ShardInfo, list[int]]:
    """Counts, checksum and token histogram of one written shard (runs where the shard is, in parallel)."""
    import numpy as np
    import pyarrow.parquet as pq

    fs, base = filesystem(location)
    path = join(base, rel)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    col = table.column("tokens")
    seq_len = col.type.list_size
    rows = (np.concatenate([c.values.to_numpy(zero_copy_only=False) for c in col.chunks]).reshape(-1, seq_len)
            if table.num_rows else np.zeros((0, seq_len), dtype=np.uint16))
    info = ShardInfo(path=rel, split=split, rows=table.num_rows, tokens=count_tokens(rows),
                     bytes=fs.get_file_info(path).size, sha256=sha256_file(fs, path))
    return info, token_histogram(rows, vocab_size).tolist()


def _normalise_names(pending: Pending, split: str) -> list[str]:
    """Rename whatever the writer produced to split/part-NNNNN.parquet, in the writer's order."""
    import pyarrow.fs as pafs

    fs = pending.store.fs
    d = join(pending.path, split)
    if fs.get_file_info(d).type != pafs.FileType.Directory:
        return []
    written = sorted(e.path for e in fs.get_file_info(pafs.FileSelector(d)) if e.path.endswith(".parquet"))
    rels = []
    for i, path in enumerate(written):
        rel = f"{split}/part-{i:05d}.parquet"
        if path != join(pending.path, rel):
            fs.move(path, join(pending.path, rel))
        rels.append(rel)
    return rels


def find_parent(store: DatasetStore, plan: SourcePlan, cfg: IngestConfig) -> DatasetVersion | None:
    """The newest version of the same source location, size cap and parameters (its previous content)."""
    same = [v for v in store.list()
            if v.manifest.source.location == plan.location and v.manifest.source.max_bytes == plan.max_bytes
            and v.manifest.lineage.params == cfg.params()]
    return same[-1] if same else None


def ingest(
    home: FactoryHome, cfg: IngestConfig, *, tenant: TenantRef, writer: Writer | None = None,
    log: Callable[[str], None] = lambda msg: None, store: DatasetStore | None = None,
) -> IngestResult:
    """Ingest ``cfg.source`` into ``home``'s dataset store; see the module docstring."""
    t0 = time.monotonic()
    store = store or DatasetStore(home)
    tok = ByteTokenizer()
    location = cfg.source or default_source()
    max_bytes = int(cfg.max_mb * 1e6) if cfg.max_mb else None
    plan = collect_source(location, max_bytes=max_bytes, suffixes=cfg.suffixes)
    version = version_id(plan, cfg, tok)
    log(f"ingest: {len(plan.documents)} files, {plan.bytes / 1e6:.2f} MB from {location} -> {version}")
    if store.exists(version):
        log(f"ingest: {version} already published (cache hit): nothing to do")
        return IngestResult(store.get(version), cache_hit=True, seconds=time.monotonic() - t0)

    from aifactory.tenancy import WorkloadKind
    from aifactory.workloads import Workload, launch

    workload = Workload(kind=WorkloadKind.INGEST, tenant=tenant, name=str(location)[-200:], resources=cfg.resources())
    write = writer or partial(ray_writer, max_tasks=cfg.max_tasks)
    return launch(workload, home=home, run=lambda handle: _publish(
        home, cfg, store=store, plan=plan, version=version, tok=tok, tenant=tenant, writer=write, log=log, t0=t0,
        handle=handle))


def _publish(home, cfg, *, store, plan, version, tok, tenant, writer, log, t0, handle) -> IngestResult:
    handle.ref("dataset_version", version)
    by_split = split_documents(plan.documents, cfg)
    parent = find_parent(store, plan, cfg)
    with store.publishing(version) as pending:
        log(f"ingest: packing {', '.join(f'{len(d)} {s} docs' for s, d in by_split.items())} into rows of {cfg.seq_len}")
        writer(by_split, fs=store.fs, out=pending.path, seq_len=cfg.seq_len, rows_per_file=rows_per_shard(cfg))
        rels = {s: _normalise_names(pending, s) for s in SPLITS}
        log(f"ingest: wrote {sum(map(len, rels.values()))} shards in {time.monotonic() - t0:.1f}s; checksumming")
        stats = _all_stats(pending.uri, rels, tok.vocab_size)
        manifest = _manifest(version, plan, cfg, tok, tenant, by_split, stats, parent)
        if parent is not None:
            drift = check_drift(manifest, parent.manifest, where=join(pending.uri, "manifest.json"))
            if drift and not cfg.allow_drift:
                first = drift[0]
                raise ContractViolation(join(store.location, version), first.rule,
                                        first.detail + "; nothing was published (pass --allow-drift to accept it)")
        published = pending.commit(manifest)
    log(f"ingest: published {version} in {time.monotonic() - t0:.1f}s")
    return IngestResult(published, cache_hit=pending.raced, seconds=time.monotonic() - t0)


def _all_stats(uri: str, rels: dict[str, list[str]], vocab_size: int):
    # Threads, not Ray tasks: hashing and Parquet decoding release the GIL, and the driver must be able
    # to reach the store anyway (it writes the manifest); tasks would only add scheduling latency.
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(rel, split) for split, rs in rels.items() for rel in rs]
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs)))) as pool:
        return list(pool.map(lambda job: shard_stats(uri, job[0], job[1], vocab_size), jobs))


def _manifest(version, plan, cfg, tok, tenant, by_split, stats, parent) -> DatasetManifest:
    import pyarrow as pa

    shards = [s for s, _ in stats]
    splits = {}
    for split in SPLITS:
        mine = [(s, h) for s, h in stats if s.split == split]
        hist = [sum(col) for col in zip(*(h for _, h in mine))] if mine else [0] * tok.vocab_size
        splits[split] = SplitStats(rows=sum(s.rows for s, _ in mine), tokens=sum(s.tokens for s, _ in mine),
                                   documents=len(by_split[split]), shards=len(mine), token_histogram=hist)
    code = code_version()
    return DatasetManifest(
        version=version, created_at=utc_now(), tenant=tenant.tenant, project=tenant.project,
        seq_len=cfg.seq_len, vocab_size=tok.vocab_size,
        arrow_schema=str(pa.schema([("tokens", token_column_type(cfg.seq_len))])),
        splits=splits, shards=shards,
        source=SourceInfo(location=plan.location, num_files=len(plan.documents), bytes=plan.bytes,
                          digest=plan.digest, max_bytes=plan.max_bytes),
        lineage=Lineage(code_version=code.sha, code_dirty=code.dirty, ingest_code_digest=ingest_code_digest(),
                        tokenizer=tok.spec(), params=cfg.params(), parent=parent.version if parent else None),
        contract=tokens_contract(cfg.seq_len, tok.vocab_size, cfg.drift),
    )
