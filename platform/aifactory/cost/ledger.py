"""The durable usage ledger: SQLite (WAL) under the factory home, outliving the Ray cluster.

Writes are idempotent: every usage record has a deterministic key (window + holder + resource) and is
written with ``INSERT OR IGNORE``. The collector commits one window's records *and* its cursor and
tracker state in a single transaction, so a collector killed mid-write either committed that window or
did not, and a restarted one rewrites it without double counting.

Schema changes are additive: a ledger written by an older factory gains the new columns with their
defaults when opened (records from before node pools are pool ``default``; records from before the
``estimated`` flag are not marked estimated), and stays readable.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aifactory.cost.records import UsageRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT PRIMARY KEY,
    window_start REAL NOT NULL, window_end REAL NOT NULL,
    tenant TEXT NOT NULL, project TEXT NOT NULL, workload TEXT NOT NULL,
    job_id TEXT NOT NULL, deployment TEXT NOT NULL, holder TEXT NOT NULL,
    resource TEXT NOT NULL, sku TEXT NOT NULL, region TEXT NOT NULL, pricing_class TEXT NOT NULL,
    quantity_s REAL NOT NULL, used_s REAL,
    written_at REAL NOT NULL,
    pool TEXT NOT NULL DEFAULT 'default',
    gpu_memory_gib_s REAL, energy_j REAL,
    estimated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_window ON usage(window_start);
CREATE INDEX IF NOT EXISTS usage_tenant ON usage(tenant, window_start);
CREATE TABLE IF NOT EXISTS collector_state (
    cluster TEXT PRIMARY KEY, cursor REAL NOT NULL, state TEXT NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS live (
    cluster TEXT NOT NULL, tenant TEXT NOT NULL, resource TEXT NOT NULL, amount REAL NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (cluster, tenant, resource)
);
CREATE TABLE IF NOT EXISTS meter_heartbeat (
    cluster TEXT PRIMARY KEY, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS live_pool (
    cluster TEXT NOT NULL, tenant TEXT NOT NULL, pool TEXT NOT NULL, resource TEXT NOT NULL, amount REAL NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (cluster, tenant, pool, resource)
);
CREATE TABLE IF NOT EXISTS serve_usage (
    key TEXT PRIMARY KEY, window_start REAL NOT NULL, window_end REAL NOT NULL,
    tenant TEXT NOT NULL, project TEXT NOT NULL, application TEXT NOT NULL,
    requests REAL NOT NULL, processing_s REAL NOT NULL, tokens REAL NOT NULL,
    answered REAL, rejected REAL
);
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY, t REAL NOT NULL, tenant TEXT NOT NULL, project TEXT NOT NULL,
    kind TEXT NOT NULL, job_id TEXT NOT NULL, count REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    t REAL NOT NULL, tenant TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL
);
"""

# UsageRecord fields, in the order rows are read back.
_RECORD_COLS = ("window_start", "window_end", "tenant", "project", "workload", "job_id", "deployment", "holder",
                "resource", "sku", "region", "pricing_class", "quantity_s", "used_s", "pool", "gpu_memory_gib_s",
                "energy_j", "estimated")
_USAGE_COLS = ("key", *_RECORD_COLS, "written_at")
# Columns added after the first schema: (name, SQL definition) for ALTER TABLE on older ledgers.
_ADDED_USAGE_COLS = (("pool", "TEXT NOT NULL DEFAULT 'default'"), ("gpu_memory_gib_s", "REAL"), ("energy_j", "REAL"),
                     ("estimated", "INTEGER NOT NULL DEFAULT 0"))

# serve_usage columns added later: answered (2xx) and rejected (429) requests; NULL on rows of older ledgers.
_ADDED_SERVE_COLS = (("answered", "REAL"), ("rejected", "REAL"))

EVENT_KINDS = ("run", "run_failed", "retry", "checkpoint_validated", "queue_wait")  # queue_wait: count = seconds


class Ledger:
    """One SQLite file. Safe to use from several processes (WAL + busy timeout); cheap to construct."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
            have_serve = {row[1] for row in db.execute("PRAGMA table_info(serve_usage)")}
        if not all(name in have for name, _ in _ADDED_USAGE_COLS) or \
                not all(name in have_serve for name, _ in _ADDED_SERVE_COLS):
            self._migrate()

    def _migrate(self) -> None:
        """Add the columns an older ledger lacks (one writer at a time: BEGIN IMMEDIATE)."""
        with self.transaction() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
            for name, definition in _ADDED_USAGE_COLS:
                if name not in have:
                    db.execute(f"ALTER TABLE usage ADD COLUMN {name} {definition}")
            have_serve = {row[1] for row in db.execute("PRAGMA table_info(serve_usage)")}
            for name, definition in _ADDED_SERVE_COLS:
                if name not in have_serve:
                    db.execute(f"ALTER TABLE serve_usage ADD COLUMN {name} {definition}")

    @classmethod
    def of(cls, home) -> Ledger:
        return cls(home.ledger_path)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- usage -------------------------------------------------------------------------------------

    @staticmethod
    def _insert_usage(db: sqlite3.Connection, records: Iterable[UsageRecord]) -> int:
        now = time.time()
        rows = [
            (r.key, r.window_start, r.window_end, r.tenant, r.project, r.workload, r.job_id, r.deployment,
             r.holder, r.resource.value, r.sku, r.region, r.pricing_class.value, r.quantity_s, r.used_s, r.pool,
             r.gpu_memory_gib_s, r.energy_j, int(r.estimated), now)
            for r in records
        ]
        before = db.total_changes
        db.executemany(f"INSERT OR IGNORE INTO usage ({','.join(_USAGE_COLS)}) VALUES "
                       f"({','.join('?' * len(_USAGE_COLS))})", rows)
        return db.total_changes - before

    def append(self, records: Iterable[UsageRecord]) -> int:
        """Write records; returns how many were new (duplicates by key are ignored)."""
        with self.transaction() as db:
            return self._insert_usage(db, records)

    def commit_window(self, cluster: str, records: Iterable[UsageRecord], *, cursor: float,
                      state: Mapping[str, Any], serve_rows: Iterable[Mapping[str, Any]] = ()) -> int:
        """Atomically write a window's records and move the collector's cursor to ``cursor``."""
        with self.transaction() as db:
            n = self._insert_usage(db, records)
            for row in serve_rows:
                db.execute(
                    "INSERT OR IGNORE INTO serve_usage (key, window_start, window_end, tenant, project, application, "
                    "requests, processing_s, tokens, answered, rejected) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (row["key"], row["window_start"], row["window_end"], row["tenant"], row.get("project", "default"),
                     row["application"], row["requests"], row["processing_s"], row["tokens"], row.get("answered"),
                     row.get("rejected")),
                )
            db.execute(
                "INSERT INTO collector_state VALUES (?,?,?,?) ON CONFLICT(cluster) DO UPDATE SET "
                "cursor=excluded.cursor, state=excluded.state, updated_at=excluded.updated_at",
                (cluster, cursor, json.dumps(state), time.time()),
            )
            return n

    def collector_state(self, cluster: str) -> tuple[float | None, dict]:
        with self._connect() as db:
            row = db.execute("SELECT cursor, state FROM collector_state WHERE cluster=?", (cluster,)).fetchone()
        return (None, {}) if row is None else (row[0], json.loads(row[1]))

    def usage(self, *, since: float | None = None, until: float | None = None,
              tenant: str | None = None) -> list[UsageRecord]:
        where, args = [], []
        if since is not None:
            where.append("window_end > ?")
            args.append(since)
        if until is not None:
            where.append("window_start < ?")
            args.append(until)
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        sql = f"SELECT {','.join(_RECORD_COLS)} FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY window_start, tenant, holder"
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return [UsageRecord(**dict(zip(_RECORD_COLS, row))) for row in rows]

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]

    # --- live holdings (quotas) ----------------------------------------------------------------------

    def set_live(self, cluster: str, amounts: Mapping[tuple[str, str], float], *,
                 by_pool: Mapping[tuple[str, str, str], float] | None = None) -> None:
        """Replace the current holdings of ``cluster``: per (tenant, resource) across its pools, and per
        (tenant, resource, pool) in ``by_pool``."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM live WHERE cluster=?", (cluster,))
            db.executemany("INSERT INTO live VALUES (?,?,?,?,?)",
                           [(cluster, t, r, a, now) for (t, r), a in amounts.items()])
            # The heartbeat says the meter sampled now, also when nothing is held (no live rows at all).
            db.execute("INSERT INTO meter_heartbeat VALUES (?,?) ON CONFLICT(cluster) DO UPDATE SET "
                       "updated_at=excluded.updated_at", (cluster, now))
            db.execute("DELETE FROM live_pool WHERE cluster=?", (cluster,))
            db.executemany("INSERT INTO live_pool VALUES (?,?,?,?,?,?)",
                           [(cluster, t, p, r, a, now) for (t, r, p), a in (by_pool or {}).items()])

    def live(self, tenant: str, *, max_age_s: float, pool: str | None = None) -> dict[str, float] | None:
        """The tenant's current holdings by resource across clusters (in ``pool`` only, if given), or None if
        no collector is fresh."""
        table, where, args = "live", "", [tenant, time.time() - max_age_s]
        if pool is not None:
            table, where = "live_pool", " AND pool = ?"
            args.append(pool)
        with self._connect() as db:
            fresh = self._last_sample(db)
            rows = db.execute(f"SELECT resource, SUM(amount) FROM {table} WHERE tenant=? AND updated_at > ?{where} "
                              "GROUP BY resource", args).fetchall()
        if fresh is None or fresh < time.time() - max_age_s:
            return None
        return {r: a for r, a in rows}

    @staticmethod
    def _last_sample(db: sqlite3.Connection) -> float | None:
        # Freshness is the meter's heartbeat, written on every sample even when nothing is held.
        row = db.execute("SELECT MAX(updated_at) FROM meter_heartbeat").fetchone()
        return row[0] if row else None

    def last_sample_at(self) -> float | None:
        """When any meter writing to this ledger last sampled (None: never)."""
        with self._connect() as db:
            return self._last_sample(db)

    def meter_health(self, cluster: str) -> dict[str, Any]:
        """What ``factory status`` shows of a cluster's meter: its last sample, its commit lag, and how many
        windows the ledger holds (of every cluster that ever wrote to it: records carry no cluster)."""
        now = time.time()
        with self._connect() as db:
            beat = db.execute("SELECT updated_at FROM meter_heartbeat WHERE cluster=?", (cluster,)).fetchone()
            row = db.execute("SELECT cursor FROM collector_state WHERE cluster=?", (cluster,)).fetchone()
            windows = db.execute("SELECT COUNT(DISTINCT window_start) FROM usage").fetchone()[0]
        return {"cluster_id": cluster,
                "last_sample_age_s": None if beat is None else round(now - beat[0], 1),
                "commit_lag_s": None if row is None else round(now - row[0], 1),
                "ledger_windows": int(windows)}

    # --- serving usage, events, alerts ---------------------------------------------------------------

    def _select(self, sql: str, keys: tuple[str, ...], *, since_clause: str, since: float | None,
                tenant: str | None) -> list[dict]:
        """Rows of ``sql`` (a SELECT of ``keys`` ending in WHERE 1=1), filtered by time and tenant, as dicts."""
        args: list = []
        if since is not None:
            sql += f" AND {since_clause}"
            args.append(since)
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        return [dict(zip(keys, r)) for r in rows]

    def serve_usage(self, *, since: float | None = None, tenant: str | None = None) -> list[dict]:
        keys = ("tenant", "project", "application", "requests", "processing_s", "tokens", "window_start", "answered",
                "rejected")
        return self._select(f"SELECT {', '.join(keys)} FROM serve_usage WHERE 1=1", keys,
                            since_clause="window_end > ?", since=since, tenant=tenant)

    def record_event(self, *, key: str, tenant: str, kind: str, project: str = "default", job_id: str = "",
                     count: float = 1.0, t: float | None = None) -> bool:
        """Record a run, a failed run, a retry or a validated checkpoint (idempotent by ``key``)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
        with self.transaction() as db:
            before = db.total_changes
            db.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?)",
                       (key, t if t is not None else time.time(), tenant, project, kind, job_id, count))
            return db.total_changes > before

    def events(self, *, since: float | None = None, tenant: str | None = None) -> list[dict]:
        keys = ("t", "tenant", "project", "kind", "job_id", "count")
        return self._select(f"SELECT {', '.join(keys)} FROM events WHERE 1=1", keys,
                            since_clause="t >= ?", since=since, tenant=tenant)

    def add_alert(self, tenant: str, kind: str, message: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO alerts VALUES (?,?,?,?)", (time.time(), tenant, kind, message))

    def alerts(self, *, since: float | None = None) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT t, tenant, kind, message FROM alerts WHERE t >= ? ORDER BY t",
                              (since or 0.0,)).fetchall()
        return [dict(zip(("t", "tenant", "kind", "message"), r)) for r in rows]
