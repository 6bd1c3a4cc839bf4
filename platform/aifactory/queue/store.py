"""The durable queue: one SQLite file, ``<home>/queue/queue.sqlite`` (WAL), that outlives every process.

Each entry is a workload waiting for (or holding) its turn on the cluster, with everything needed to start it
again (the launch payload: for a job its entrypoint, runtime_env, metadata and entrypoint resources). States::

    queued -> dispatching -> running -> succeeded | failed | stopped
       ^            |           |
       +------------+           +-> preempting -> queued (re-queued, next attempt)
    queued -> cancelled

Nothing is lost on a crash and nothing starts twice: a dispatch *claims* the row (``queued -> dispatching``,
one transaction, ``attempts + 1``), submits the Ray job under the deterministic submission id
:func:`submission_id` (``<entry id>``, then ``<entry id>-a<N>`` for attempt N), then marks it ``running``.
A dispatcher that died between the two leaves the row ``dispatching``; the next pass looks that submission
id up in Ray's job table (present: ``running``; absent: back to ``queued``). Ray's JobSubmissionClient
refuses a second job with the same submission id, which guards the submit itself.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.exceptions import NotFound

State = Literal["queued", "dispatching", "running", "preempting", "succeeded", "failed", "stopped", "cancelled"]
WAITING: tuple[str, ...] = ("queued", "dispatching")
ACTIVE: tuple[str, ...] = ("dispatching", "running", "preempting")
TERMINAL: tuple[str, ...] = ("succeeded", "failed", "stopped", "cancelled")


class QueueEntry(StrictModel):
    """One workload in the queue (or that passed through it)."""

    id: str = Field(description="The entry's id; the first attempt's Ray submission id and the run record's id.")
    tenant: str = Field(description="Whose work it is.")
    project: str = Field(default="default", description="The tenant's project.")
    lane: str = Field(description="The lane it queues in.")
    priority: int = Field(description="Its priority within the lane.")
    kind: str = Field(description="The workload kind (other, train, bench, ...).")
    name: str = Field(description="The workload's name (entrypoint, recipe, spec).")
    resources: dict[str, float] = Field(description="Everything it holds at once, in Ray's spelling.")
    pool: str | None = Field(default=None, description="The node pool it is pinned to, if any.")
    payload: dict[str, Any] = Field(description="What starts it: the Workload and the Ray job submission.")
    actor: str = Field(description="Who queued it.")
    state: State = Field(default="queued", description="Where it is in its life.")
    enqueued_at: float = Field(description="When it was queued first (kept across preemptions).")
    started_at: float | None = Field(default=None, description="When its current attempt started.")
    finished_at: float | None = Field(default=None, description="When it ended.")
    attempts: int = Field(default=0, description="Dispatches so far (the current attempt's number).")
    submission_id: str | None = Field(default=None, description="The Ray submission id of the current attempt.")
    reason: str | None = Field(default=None, description="Why it waits (the last pass's reason), or how it ended.")
    eta_s: float | None = Field(default=None, description="Estimated seconds until it starts (last pass).")
    share: float | None = Field(default=None, description="Its tenant's fair share when last ordered.")
    position: int | None = Field(default=None, description="Its place in the queue (1: next), last pass.")
    queue_wait_s: float = Field(default=0.0, description="Seconds spent queued, over all attempts so far.")
    preemptions: list[dict[str, Any]] = Field(default_factory=list, description="Each time it was asked to yield.")
    expected_runtime_s: float | None = Field(default=None, description="Declared runtime, for ETAs.")
    updated_at: float = Field(default=0.0, description="Last change.")


def submission_id(entry_id: str, attempt: int) -> str:
    """The Ray submission id of ``attempt`` (1-based) of an entry: deterministic, so a retry after a crash
    cannot start a second copy."""
    return entry_id if attempt <= 1 else f"{entry_id}-a{attempt}"


_COLUMNS = list(QueueEntry.model_fields)
_JSON = {"resources", "payload", "preemptions"}
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries (
    {", ".join(f"{c} {'TEXT PRIMARY KEY' if c == 'id' else ''}" for c in _COLUMNS)}
);
CREATE INDEX IF NOT EXISTS entries_state ON entries(state);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries(tenant);
"""


def queue_path(home) -> Path:
    return home.root / "queue" / "queue.sqlite"


class QueueStore:
    """The queue's rows; every change is one transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @classmethod
    def of(cls, home) -> QueueStore:
        return cls(queue_path(home))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        try:
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

    @staticmethod
    def _row(entry: QueueEntry) -> list[Any]:
        data = entry.model_dump(mode="json")
        return [json.dumps(data[c]) if c in _JSON else data[c] for c in _COLUMNS]

    @staticmethod
    def _entry(row: Iterable[Any]) -> QueueEntry:
        data = dict(zip(_COLUMNS, row))
        for c in _JSON:
            data[c] = json.loads(data[c]) if data[c] is not None else None
        return QueueEntry.model_validate(data)

    def add(self, entry: QueueEntry) -> QueueEntry:
        """Queue ``entry`` (its id must be new)."""
        entry = entry.model_copy(update={"updated_at": time.time()})
        try:
            with self.transaction() as db:
                db.execute(f"INSERT INTO entries VALUES ({','.join('?' * len(_COLUMNS))})", self._row(entry))
        except sqlite3.IntegrityError:
            from aifactory.exceptions import FactoryError

            raise FactoryError(f"queue entry {entry.id!r} exists already; use another submission id") from None
        return entry

    def get(self, entry_id: str) -> QueueEntry:
        with self._connect() as db:
            row = db.execute(f"SELECT {','.join(_COLUMNS)} FROM entries WHERE id=?", (entry_id,)).fetchone()
        if row is None:
            raise NotFound("queue entry", entry_id, "`factory queue` lists the queue")
        return self._entry(row)

    def find(self, entry_id: str) -> QueueEntry | None:
        try:
            return self.get(entry_id)
        except NotFound:
            return None

    def find_submission(self, sub_id: str) -> QueueEntry | None:
        """The entry whose current or an earlier attempt has Ray submission id ``sub_id``."""
        m = re.fullmatch(r"(.+)-a(\d+)", sub_id)
        base = m.group(1) if m else sub_id
        for candidate in (sub_id, base):
            entry = self.find(candidate)
            if entry is not None:
                return entry
        return None

    def list(self, *, states: Iterable[str] | None = None, tenant: str | None = None, lane: str | None = None,
             since: float | None = None) -> list[QueueEntry]:
        """Entries, oldest first; ``since``: only those active or finished after it."""
        sql, args = f"SELECT {','.join(_COLUMNS)} FROM entries WHERE 1=1", []
        if states is not None:
            states = list(states)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        if tenant is not None:
            sql += " AND tenant=?"
            args.append(tenant)
        if lane is not None:
            sql += " AND lane=?"
            args.append(lane)
        if since is not None:
            sql += " AND (finished_at IS NULL OR finished_at >= ?)"
            args.append(since)
        with self._connect() as db:
            rows = db.execute(sql + " ORDER BY enqueued_at, id", args).fetchall()
        return [self._entry(r) for r in rows]

    def transition(self, entry_id: str, from_states: Iterable[str], to_state: str, **fields: Any) -> QueueEntry | None:
        """Move the entry to ``to_state`` (and set ``fields``) only if it is in one of ``from_states``, in one
        transaction; returns the new entry, or None when it was elsewhere (someone else moved it)."""
        from_states = list(from_states)
        with self.transaction() as db:
            row = db.execute(f"SELECT {','.join(_COLUMNS)} FROM entries WHERE id=?", (entry_id,)).fetchone()
            if row is None:
                return None
            entry = self._entry(row)
            if entry.state not in from_states:
                return None
            new = entry.model_copy(update={**fields, "state": to_state, "updated_at": time.time()})
            QueueEntry.model_validate(new.model_dump())  # the fields are checked before they are written
            db.execute(f"UPDATE entries SET {','.join(f'{c}=?' for c in _COLUMNS)} WHERE id=?",
                       [*self._row(new), entry_id])
        return new

    def claim(self, entry_id: str) -> QueueEntry | None:
        """``queued -> dispatching`` with the next attempt's submission id; None if it was not queued."""
        with self.transaction() as db:
            cur = db.execute("UPDATE entries SET state='dispatching', attempts=attempts+1, updated_at=? "
                             "WHERE id=? AND state='queued'", (time.time(), entry_id))
            if cur.rowcount != 1:
                return None
            (attempts,) = db.execute("SELECT attempts FROM entries WHERE id=?", (entry_id,)).fetchone()
            db.execute("UPDATE entries SET submission_id=? WHERE id=?", (submission_id(entry_id, attempts), entry_id))
        return self.get(entry_id)

    def note_waits(self, waits: Mapping[str, tuple[str, float | None, float | None, int | None]]) -> None:
        """The last pass's (reason, eta_s, share, position) of each waiting entry, in one transaction."""
        if not waits:
            return
        with self.transaction() as db:
            db.executemany("UPDATE entries SET reason=?, eta_s=?, share=?, position=? WHERE id=? AND state='queued'",
                           [(r, e, s, p, i) for i, (r, e, s, p) in waits.items()])

    def median_runtimes(self, *, since: float) -> dict[str, float]:
        """Name -> median runtime of its entries that succeeded since ``since`` (for ETAs)."""
        with self._connect() as db:
            rows = db.execute("SELECT name, finished_at - started_at FROM entries WHERE state='succeeded' AND "
                              "finished_at >= ? AND started_at IS NOT NULL", (since,)).fetchall()
        by: dict[str, list[float]] = {}
        for name, d in rows:
            by.setdefault(name, []).append(float(d))
        return {n: sorted(ds)[len(ds) // 2] for n, ds in by.items()}

    def prune(self, *, before: float, lane: str | None = None) -> int:
        """Forget finished entries that ended before ``before`` (retention)."""
        sql, args = f"DELETE FROM entries WHERE state IN ({','.join('?' * len(TERMINAL))}) AND finished_at < ?", \
            [*TERMINAL, before]
        if lane is not None:
            sql += " AND lane=?"
            args.append(lane)
        with self.transaction() as db:
            return db.execute(sql, args).rowcount


__all__ = ["ACTIVE", "TERMINAL", "WAITING", "QueueEntry", "QueueStore", "queue_path", "submission_id"]
