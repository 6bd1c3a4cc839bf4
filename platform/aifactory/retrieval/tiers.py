"""Freshness tiers: what a retrieval reads, and how stale it may be.

Two tiers, as the feature stores have them (offline snapshots for training, an online store for serving):

- ``snapshot``: one fixed index version (:func:`~aifactory.retrieval.index.load_index`), for reproducible runs:
  the same query returns the same chunks for as long as the run names that version.
- ``fresh``: that snapshot as a base, plus upserts of new or changed documents held in an in-memory faiss
  index. An upsert of a document replaces its older chunks, whether they are in the base or an earlier upsert.
  Every entry carries its ingest time and TTL, and a read never returns an entry past its TTL as fresh: it is
  dropped, or returned flagged ``expired`` (``expired_policy``). Feast's online store returns a value past its
  TTL as present (feast-dev/feast#6821); a copilot answering from a withdrawn document is that bug.

The fresh tier's SLA (``sla_s``): an upsert is searchable once applied. With ``apply_interval_s`` 0 it is applied
before :meth:`FreshTier.upsert` returns; otherwise upserts wait (durably logged) and a search or :meth:`apply`
applies those that have waited ``apply_interval_s``, so the freshness lag (:meth:`FreshTier.lag_s`, the age of
the oldest accepted upsert not yet searchable) stays under the SLA. :func:`freshness_alert_rule` is the
Prometheus rule that fires when it does not (lag > 2x the SLA, the Tecton default).

Every accepted upsert is appended to a JSONL log under the tier's directory and fsync'd before ``upsert``
returns, so a replica that restarts rebuilds the tier from the log (:meth:`FreshTier.open`) and a crash loses
no accepted upsert; a torn last line is an upsert that was never acknowledged and is skipped.

Pure Python over faiss and numpy: nothing here imports Ray, Serve or torch.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from aifactory.config import StrictModel
from aifactory.exceptions import (
    ConfigError,
    EmbeddingModelMismatch,
    IntegrityError,
    PermissionDenied,
)
from aifactory.retrieval.index import Chunk, LoadedIndex, check_model
from aifactory.retrieval.model import EmbeddingModelId

LOG_FILE = "upserts.jsonl"
Clock = Callable[[], float]


class TierConfig(StrictModel):
    """Which tier a tenant's requests read, and its freshness promises."""

    kind: Literal["snapshot", "fresh"] = Field(
        "snapshot", description="'snapshot': one fixed index version, nothing else (reproducible runs); 'fresh': "
        "that version plus upserted documents, each with a TTL.")
    index_version: str | None = Field(
        None, description="The index version the tier reads (its base, for 'fresh'); required for 'snapshot' so a "
        "run names what it read. None ('fresh' only): the tenant's newest at load time.")
    ttl_s: float = Field(86400.0, gt=0, description="Seconds an upserted entry stays fresh after its ingest.")
    base_ttl_s: float | None = Field(
        None, gt=0, description="Seconds the base index's entries stay fresh after the index was built; None: they "
        "never expire here (a snapshot's age is checked when it is loaded).")
    sla_s: float = Field(5.0, gt=0, description="Freshness SLA: an accepted upsert is searchable within this many "
                         "seconds.")
    apply_interval_s: float = Field(
        0.0, ge=0, description="0: an upsert is searchable before upsert() returns; > 0: upserts are applied in "
        "batches once the oldest has waited this long (must be under sla_s).")
    expired_policy: Literal["drop", "flag"] = Field(
        "drop", description="An entry past its TTL: 'drop' it from results, or 'flag' it (expired=True, fresh=False).")

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.kind == "snapshot" and self.index_version is None:
            problems.append("index_version: a 'snapshot' tier names its index version (kind='snapshot', "
                            "index_version=None)")
        if self.apply_interval_s >= self.sla_s:
            problems.append(f"apply_interval_s: {self.apply_interval_s:g}s would break the freshness SLA "
                            f"(sla_s={self.sla_s:g}s); use an interval under the SLA")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk with what the tier knows about its freshness."""

    chunk: Chunk
    score: float  # cosine similarity to the query
    origin: Literal["base", "fresh"]  # the snapshot index, or an upsert
    ingest_s: float  # epoch seconds the entry was ingested (the index's build time for base entries)
    expires_s: float | None  # epoch seconds past which it is no longer fresh; None: never
    fresh: bool  # an upserted entry within its TTL
    expired: bool  # past its TTL (returned only under expired_policy='flag')


def _check_query(vector, k: int, dim: int):
    import numpy as np

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: the number of chunks to retrieve must be an integer >= 1 (got {k!r})")
    q = np.asarray(vector, dtype="float32").reshape(-1)
    if q.shape != (dim,) or not np.isfinite(q).all():
        raise ValueError(f"vector: a query vector has {dim} finite values (got shape {np.shape(vector)})")
    return q.reshape(1, -1)


def _expiry(ingest_s: float, ttl_s: float | None) -> float | None:
    return None if ttl_s is None else ingest_s + ttl_s


class SnapshotTier:
    """One index version, read as it is: every hit is a base hit (``fresh`` False)."""

    def __init__(self, base: LoadedIndex, config: TierConfig, *, clock: Clock = time.time):
        if config.index_version is not None and config.index_version != base.version:
            raise ConfigError("retrieval tier", [
                f"index_version: the tier names {config.index_version} but the loaded index is {base.version}"])
        self.base = base
        self.config = config
        self.clock = clock
        self._base_ingest_s = base.manifest.created_epoch_s()

    @property
    def version(self) -> str:
        return self.base.version

    def _base_hits(self, q, k: int, now: float, skip: set[int] = frozenset()) -> list[Hit]:
        n = len(self.base.chunks)
        if not n:
            return []
        expires = _expiry(self._base_ingest_s, self.config.base_ttl_s)
        expired = expires is not None and now >= expires
        if expired and self.config.expired_policy == "drop":
            return []
        scores, ids = self.base.index.search(q, min(n, k + len(skip)))
        hits = []
        for i, s in zip(ids[0], scores[0]):
            if i < 0 or int(i) in skip:
                continue
            hits.append(Hit(self.base.chunks[int(i)], float(s), "base", self._base_ingest_s, expires,
                            fresh=False, expired=expired))
        return hits[:k]

    def search(self, vector, k: int) -> list[Hit]:
        """The ``k`` nearest chunks to one query vector, best first."""
        return self._base_hits(_check_query(vector, k, self.base.manifest.embedding_model.dim), k, self.clock())


@dataclass
class _Entry:
    chunk: Chunk
    ingest_s: float
    expires_s: float


class FreshTier(SnapshotTier):
    """A snapshot base plus upserted documents, each entry with its ingest time and TTL.

    Build one with :meth:`open`, which replays the durable log under ``state_dir``."""

    def __init__(self, base: LoadedIndex, config: TierConfig, *, state_dir: str | Path, tenant: str,
                 clock: Clock = time.time):
        import faiss

        if config.kind != "fresh":
            raise ConfigError("retrieval tier", [f"kind: a FreshTier needs kind='fresh' (got {config.kind!r})"])
        super().__init__(base, config, clock=clock)
        if base.manifest.tenant != tenant:
            raise PermissionDenied(f"index {base.version} belongs to tenant {base.manifest.tenant!r}, not "
                                   f"{tenant!r}; a tenant's fresh tier builds on its own index")
        self.tenant = tenant
        self.model: EmbeddingModelId = base.manifest.embedding_model
        self.state_dir = Path(state_dir)
        self._lock = threading.Lock()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.model.dim))
        self._entries: dict[int, _Entry] = {}
        self._doc_ids: dict[str, list[int]] = {}  # doc -> its fresh entries' ids
        self._base_rows: dict[str, list[int]] = {}
        for row, c in enumerate(base.chunks):
            self._base_rows.setdefault(c.doc_id, []).append(row)
        self._masked: set[int] = set()  # base rows replaced by an upsert
        self._pending: list[dict] = []  # accepted (logged) but not yet searchable
        self._next_id = 0

    # ---- building -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, base: LoadedIndex, config: TierConfig, *, state_dir: str | Path, tenant: str,
             clock: Clock = time.time) -> FreshTier:
        """The tier over ``base`` with every upsert logged under ``state_dir`` applied, in the order accepted."""
        tier = cls(base, config, state_dir=state_dir, tenant=tenant, clock=clock)
        path = tier.state_dir / LOG_FILE
        if not path.exists():
            return tier
        raw = path.read_bytes()
        complete = raw[:raw.rfind(b"\n") + 1]
        if len(complete) < len(raw):
            # a torn last line is an upsert that was never acknowledged (its fsync did not return): cut it, so
            # the next append starts on a line of its own
            with path.open("r+b") as f:
                f.truncate(len(complete))
        for number, line in enumerate(complete.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                tier._check_record(record, path)
                tier._apply_record(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise IntegrityError(f"{path}:{number}", "one JSON upsert per line",
                                     f"an unreadable line ({type(err).__name__})") from None
        return tier

    def _check_record(self, record: dict, path: Path) -> None:
        if record["tenant"] != self.tenant:
            raise PermissionDenied(f"{path}: the log holds tenant {record['tenant']!r}'s upserts, not "
                                   f"{self.tenant!r}'s; give each tenant its own state_dir")
        if record["model_digest"] != self.model.digest:
            raise EmbeddingModelMismatch(f"fresh-tier log {path}", f"sha256 {record['model_digest'][:12]}",
                                         self.model.short())

    # ---- writes -------------------------------------------------------------------------------------

    def upsert(self, doc_id: str, chunks: Sequence[str], vectors, *, model: EmbeddingModelId,
               source: str | None = None) -> None:
        """Accept a new or changed document: its ``chunks`` (texts, in passage order) and their ``vectors``
        (one row each, from ``model``) replace whatever the tier held for ``doc_id``. Durable on return."""
        import numpy as np

        check_model(f"upsert of {doc_id!r}", self.model, model)
        problems = []
        if not isinstance(doc_id, str) or not doc_id.strip():
            problems.append(f"doc_id: a non-empty string (got {doc_id!r})")
        if isinstance(chunks, str) or not isinstance(chunks, Sequence) or not chunks:
            problems.append("chunks: a non-empty list of texts")
        elif not all(isinstance(c, str) and c.strip() for c in chunks):
            problems.append("chunks: every chunk is non-empty text")
        vecs = np.asarray(vectors, dtype="float32")
        n = len(chunks) if isinstance(chunks, Sequence) else 0
        if vecs.shape != (n, self.model.dim) or not np.isfinite(vecs).all():
            problems.append(f"vectors: one row of {self.model.dim} finite values per chunk (got shape {vecs.shape} "
                            f"for {n} chunks)")
        if problems:
            raise ConfigError("fresh-tier upsert", problems)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.where(norms > 0, norms, 1.0)  # inner product is cosine only for unit vectors
        now = self.clock()
        record = {"tenant": self.tenant, "model_digest": self.model.digest, "doc_id": doc_id,
                  "source": source or self._base_source(doc_id), "chunks": list(chunks), "ingest_s": now, "ttl_s": self.config.ttl_s,
                  "vectors": base64.b64encode(np.ascontiguousarray(vecs).tobytes()).decode()}
        with self._lock:
            self._append(record)
            self._pending.append(record)
            if self.config.apply_interval_s == 0:
                self._apply_pending(now, force=True)

    def _base_source(self, doc_id: str) -> str:
        rows = self._base_rows.get(doc_id)
        return self.base.chunks[rows[0]].source if rows else doc_id

    def _append(self, record: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.state_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)  # accepted means on disk: a crash after this loses nothing
        finally:
            os.close(fd)

    def apply(self) -> int:
        """Make every accepted upsert searchable now; returns how many were applied."""
        with self._lock:
            return self._apply_pending(self.clock(), force=True)

    def _apply_pending(self, now: float, *, force: bool) -> int:
        if not self._pending or not (force or now - self._pending[0]["ingest_s"] >= self.config.apply_interval_s):
            return 0
        applied = len(self._pending)
        for record in self._pending:
            self._apply_record(record)
        self._pending.clear()
        return applied

    def _apply_record(self, record: dict) -> None:
        import numpy as np

        doc_id = record["doc_id"]
        old = self._doc_ids.pop(doc_id, [])
        if old:
            self._index.remove_ids(np.asarray(old, dtype="int64"))
            for i in old:
                del self._entries[i]
        self._masked.update(self._base_rows.get(doc_id, []))
        vecs = np.frombuffer(base64.b64decode(record["vectors"]), dtype="float32").reshape(-1, self.model.dim)
        ids = np.arange(self._next_id, self._next_id + len(vecs), dtype="int64")
        self._next_id += len(vecs)
        self._index.add_with_ids(vecs, ids)
        expires = _expiry(record["ingest_s"], record["ttl_s"])
        for passage, (i, text) in enumerate(zip(ids, record["chunks"])):
            self._entries[int(i)] = _Entry(Chunk(doc_id, passage, text, record["source"]), record["ingest_s"], expires)
        self._doc_ids[doc_id] = [int(i) for i in ids]

    # ---- reads --------------------------------------------------------------------------------------

    def search(self, vector, k: int) -> list[Hit]:
        """The ``k`` nearest chunks over the base and the applied upserts, best first; an upserted document's
        base chunks are never returned, and no entry past its TTL is returned as fresh."""
        q = _check_query(vector, k, self.model.dim)
        now = self.clock()
        with self._lock:
            self._apply_pending(now, force=False)
            hits = self._base_hits(q, k, now, skip=self._masked)
            if self._index.ntotal:
                scores, ids = self._index.search(q, min(k + self._num_expired(now), self._index.ntotal))
                for i, s in zip(ids[0], scores[0]):
                    if i < 0:
                        continue
                    e = self._entries[int(i)]
                    expired = now >= e.expires_s
                    if expired and self.config.expired_policy == "drop":
                        continue
                    hits.append(Hit(e.chunk, float(s), "fresh", e.ingest_s, e.expires_s, fresh=not expired,
                                    expired=expired))
        hits.sort(key=lambda h: -h.score)
        return hits[:k]

    def _num_expired(self, now: float) -> int:
        # dropped entries must not crowd live ones out of the top k
        return sum(1 for e in self._entries.values() if now >= e.expires_s) \
            if self.config.expired_policy == "drop" else 0

    # ---- freshness numbers --------------------------------------------------------------------------

    def lag_s(self) -> float:
        """Age of the oldest accepted upsert that is not yet searchable (0: every accepted upsert is)."""
        with self._lock:
            return max(0.0, self.clock() - self._pending[0]["ingest_s"]) if self._pending else 0.0

    @property
    def freshness_lag_s(self) -> float:
        return self.lag_s()

    @property
    def freshness_sla_s(self) -> float:
        return self.config.sla_s

    def gauges(self) -> dict[str, float]:
        """The numbers a Prometheus exporter publishes for this tier."""
        return {"freshness_lag_s": self.lag_s(), "freshness_sla_s": self.config.sla_s}


def freshness_alert_rule(sla_s: float, *, metric: str = "aifactory_retrieval_freshness_lag_seconds",
                         for_s: float = 60.0) -> dict:
    """A Prometheus alerting rule that fires when the freshness lag exceeds twice the SLA (Tecton's default
    threshold) for ``for_s`` seconds; goes under ``groups[].rules`` of a rules file."""
    if isinstance(sla_s, bool) or not isinstance(sla_s, (int, float)) or not sla_s > 0:
        raise ValueError(f"sla_s: the freshness SLA in seconds, > 0 (got {sla_s!r})")
    threshold = 2 * float(sla_s)
    return {
        "alert": "RetrievalFreshnessLagHigh",
        "expr": f"max by (tenant) ({metric}) > {threshold:g}",
        "for": f"{round(for_s)}s",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "Retrieval fresh tier is behind its SLA",
            "description": f"Upserts of tenant {{{{ $labels.tenant }}}} wait {{{{ $value | humanizeDuration }}}} "
                           f"to become searchable, over 2x the {float(sla_s):g}s freshness SLA.",
        },
    }


def open_tier(base: LoadedIndex, config: TierConfig, *, tenant: str, state_dir: str | Path | None = None,
              clock: Clock = time.time) -> SnapshotTier:
    """The tier ``config`` names over ``base`` (loaded with :func:`~aifactory.retrieval.index.load_index`)."""
    if config.kind == "snapshot":
        if base.manifest.tenant != tenant:
            raise PermissionDenied(f"index {base.version} belongs to tenant {base.manifest.tenant!r}, not {tenant!r}")
        return SnapshotTier(base, config, clock=clock)
    if state_dir is None:
        raise ConfigError("retrieval tier", ["state_dir: a 'fresh' tier logs its upserts under a directory"])
    return FreshTier.open(base, config, state_dir=state_dir, tenant=tenant, clock=clock)
