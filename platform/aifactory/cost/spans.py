"""What each driver was doing when it took capacity: workload spans from the front door's run records.

A driver that launches several workloads in turn (``factory run``: data, train, serve, bench) is one Ray job,
and Ray tags everything it starts with that job's metadata, so its training run's placement group would be
metered as the driver's own kind and ``cost per validated checkpoint`` would read $0. The front door writes a
run record per launch (``<home>/workloads/<id>.json``: kind, Ray job id, start and end), so the meter can tell:
a holding of job J that began while J ran a launch of kind K is K's. A holding the job began outside any of
its launches keeps the job's own tag.

Only records that run *inside* their driver are spans: detached ones (a submitted job, a deployment: status
``started``) run elsewhere and are tagged by their own job or deployment, and a sweep's trials (``within``)
belong to the sweep that declared them. Records are parsed as plain JSON here (the cost component does not
import the front door, which imports cost for admission); the fields read are ``workload.kind``,
``ray_job_id``, ``status``, ``started_at``, ``finished_at`` and ``within``. Pure but for the file reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from aifactory.cost.attribution import Holding

log = logging.getLogger("aifactory.cost")

# A holding may be created a moment before its launch's record says "running" (clocks of one host, but the
# record is written just before the start call): this much slack on the span's start.
START_SLACK_S = 1.0


@dataclass(frozen=True)
class Span:
    job_id: str
    kind: str
    start: float
    end: float | None  # None: still running


def span_of(record: dict) -> Span | None:
    """The span of one run record (as JSON), or None when it is not one (see the module doc)."""
    try:
        job_id, start = record.get("ray_job_id"), record.get("started_at")
        if not job_id or start is None or record.get("within") or record.get("status") == "started":
            return None
        return Span(job_id=str(job_id), kind=str(record["workload"]["kind"]), start=float(start),
                    end=None if record.get("finished_at") is None else float(record["finished_at"]))
    except (KeyError, TypeError, ValueError):
        return None


def retag(holding: Holding, spans: Iterable[Span]) -> Holding:
    """``holding`` with the kind of its job's launch that was running when it began (the latest such launch
    when several overlap), else unchanged. Serve replicas (a ``deployment``) are always ``serve``."""
    if holding.deployment or not holding.job_id or holding.start is None:
        return holding
    best: Span | None = None
    for s in spans:
        if s.job_id != holding.job_id or holding.start < s.start - START_SLACK_S:
            continue
        if s.end is not None and holding.start >= s.end:
            continue
        if best is None or s.start > best.start:
            best = s
    return holding if best is None or best.kind == holding.workload else replace(holding, workload=best.kind)


class SpanReader:
    """Reads the run records of one factory home, re-parsing only files that changed since the last read."""

    def __init__(self, records_dir: str | Path):
        self.dir = Path(records_dir)
        self._cache: dict[str, tuple[float, Span | None]] = {}

    def spans(self) -> list[Span]:
        if not self.dir.is_dir():
            return []
        out, seen = [], set()
        for entry in os.scandir(self.dir):
            if not entry.name.endswith(".json"):
                continue
            seen.add(entry.name)
            try:
                mtime = entry.stat().st_mtime
                cached = self._cache.get(entry.name)
                if cached is None or cached[0] != mtime:
                    span = span_of(json.loads(Path(entry.path).read_text()))
                    self._cache[entry.name] = (mtime, span)
                else:
                    span = cached[1]
            except (OSError, ValueError) as err:  # a record being replaced: read it next sample
                log.debug("run record %s unreadable now: %s", entry.name, err)
                continue
            if span is not None:
                out.append(span)
        for name in [n for n in self._cache if n not in seen]:
            del self._cache[name]
        return out


def over_declared(holdings: Iterable[Holding], declared: dict[str, dict[str, float]], *,
                  tolerance: float = 1e-6) -> dict[str, dict[str, tuple[float, float]]]:
    """Jobs holding more than they declared: ``{job_id: {resource: (held, declared)}}``.

    ``holdings`` are the open holdings of one sample; ``declared`` is ``{job_id: {"cpu": n, "gpu": g}}`` from
    the jobs' metadata (``declared_cpu`` / ``declared_gpu``, written by the front door). Only jobs that
    declared something are checked. Pure."""
    held: dict[str, dict[str, float]] = {}
    for h in holdings:
        if not h.job_id or h.job_id not in declared or h.deployment or h.end is not None:
            continue
        row = held.setdefault(h.job_id, {})
        for key, amount in h.resources.items():
            resource = key[0]
            if resource in ("cpu", "gpu"):
                row[resource] = row.get(resource, 0.0) + amount
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for job_id, row in held.items():
        for resource, amount in row.items():
            limit = declared[job_id].get(resource)
            if limit is not None and amount > limit + tolerance:
                out.setdefault(job_id, {})[resource] = (amount, limit)
    return out
