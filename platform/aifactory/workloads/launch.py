"""The one launch path: admit, start, record, meter.

``launch(workload, home=..., run=...)`` does, in order:

1. **admission**: the tenant's quota (against the meter's live holdings; fails closed when the meter is
   not fresh) and budget, :func:`aifactory.cost.admission.admit`. A refusal raises before anything starts
   and before anything is recorded;
2. **start**: ``run(handle)``, the component's own start (a job submission, a Ray Train fit, a Serve deploy, a Tune sweep);
3. **the run record**: a typed :class:`RunRecord` under ``<home>/workloads/``, written atomically when the
   work is admitted, when it starts and when it ends, with links to the component's own ids;
4. **cost events**: ``run`` for every launched workload, ``run_failed`` when its start or run raised, and
   whatever the component adds through the handle (``retry``, ``checkpoint_validated``), idempotent by key.

The meter (the collector actor) attributes the resource-seconds the work then holds; the events let the
cost KPIs divide those dollars by outcomes (cost per validated checkpoint counts failed runs too).
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.exceptions import NotFound, Preempted, error_line
from aifactory.home import FactoryHome
from aifactory.workloads.spec import Workload

T = TypeVar("T")

Status = Literal["admitted", "running", "started", "succeeded", "failed", "preempted"]


class RunRecord(StrictModel):
    """What the factory knows of one launched workload."""

    id: str = Field(description="The record's id (a training run uses its run id).")
    workload: Workload
    status: Status = Field(description="admitted -> running -> succeeded | failed | preempted (it yielded and "
                                       "can resume: aifactory.train.yielding); `started` for work that runs "
                                       "on by itself after launch (a submitted job, a deployment).")
    actor: str = Field(description="Who launched it (OS user or control-API key).")
    admitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    ray_job_id: str | None = Field(default=None, description="The Ray job that holds its resources.")
    refs: dict[str, str] = Field(default_factory=dict, description="The component's own ids (run, app, sweep).")
    within: str | None = Field(default=None, description="The admitted workload this one runs inside (a sweep's "
                                                         "trial), whose declared resources include it.")
    events: list[str] = Field(default_factory=list, description="Cost-event keys recorded for it.")
    error: str | None = None
    queued_at: float | None = Field(default=None, description="When it entered the queue (None: not queued).")
    queue_wait_s: float | None = Field(default=None, description="Seconds it waited in the queue, all attempts.")
    attempt: int = Field(default=1, description="Which start this is (a preempted workload starts again).")
    preemptions: list[dict[str, Any]] = Field(default_factory=list,
                                              description="Each time the queue asked it to yield, and why.")


def records_dir(home: FactoryHome) -> Path:
    return home.root / "workloads"


def _write(home: FactoryHome, record: RunRecord) -> None:
    path = records_dir(home) / f"{record.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    os.replace(tmp, path)


def read_record(home: FactoryHome, record_id: str) -> RunRecord:
    path = records_dir(home) / f"{record_id}.json"
    if not path.is_file():
        raise NotFound("workload", record_id, f"no {path}")
    return RunRecord.model_validate_json(path.read_text())


def list_records(home: FactoryHome, *, tenant: str | None = None) -> list[RunRecord]:
    """Every run record, oldest first (``tenant``'s only, when given)."""
    d = records_dir(home)
    out = [RunRecord.model_validate_json(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    out = [r for r in out if tenant is None or r.workload.tenant.tenant == tenant]
    return sorted(out, key=lambda r: r.admitted_at)


def new_record_id(kind: str) -> str:
    return f"{kind}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class RunHandle:
    """What ``run`` gets: the record, and the two ways to add to it."""

    def __init__(self, home: FactoryHome, record: RunRecord):
        self.home = home
        self.record = record

    @property
    def id(self) -> str:
        return self.record.id

    def ref(self, key: str, value: str) -> None:
        """Link a component id (``run_id``, ``app``, ``submission_id``) to the record."""
        self.record.refs[key] = str(value)
        _write(self.home, self.record)

    def event(self, kind: str, key: str, count: float = 1.0) -> None:
        """A cost event of this workload (``retry``, ``checkpoint_validated``), idempotent by ``key``."""
        from aifactory.cost.ledger import Ledger

        full = f"{self.record.id}:{key}"
        t = self.record.workload.tenant
        Ledger.of(self.home).record_event(key=full, tenant=t.tenant, project=t.project, kind=kind,
                                          job_id=self.record.ray_job_id or "", count=count)
        if full not in self.record.events:
            self.record.events.append(full)
            _write(self.home, self.record)


def launch(workload: Workload, *, home: FactoryHome, run: Callable[[RunHandle], T], record_id: str | None = None,
           actor: str | None = None, detached: bool = False, within: str | None = None,
           connect: Callable[[], object] | None = None, queued_at: float | None = None,
           queue_wait_s: float | None = None, attempt: int = 1, preemptions: list[dict[str, Any]] | None = None,
           own_job: bool = True) -> T:
    """Admit ``workload``, start it with ``run(handle)``, record it and its cost events; return what ``run``
    returns. ``detached``: the work runs on by itself after ``run`` returns (a submitted job, a deployment),
    so the record ends as ``started``, not ``succeeded``. ``within``: the id of an admitted workload this one
    runs inside and whose declaration covers it (a sweep's trials): recorded and metered, not admitted twice
    against holdings that already count its parent. ``connect``: attach this process to Ray only once the work
    is admitted (a refused ``factory train`` leaves no driver job behind). ``queued_at`` / ``queue_wait_s`` /
    ``attempt`` / ``preemptions``: what the queue knows of it (:mod:`aifactory.queue`). ``own_job=False``: the
    work runs in a Ray job of its own (a submission), not in this driver's, so the record names no driver job
    (the dispatcher is a driver too: its job must not be taken for the work's). Raises the admission error (QuotaExceeded,
    MeterUnavailable, BudgetExceeded) with nothing started and no run record (the refusal is audited), or
    whatever ``run`` raised (recorded as failed)."""
    from aifactory import audit
    from aifactory.cost.admission import admit
    from aifactory.provenance import whoami

    home = home.ensure()
    actor = actor or whoami()
    try:
        if within is None:
            admit(home, workload.tenant, workload.resources.as_ray(), workload.kind, pool=workload.pool,
                  lane=workload.lane)
    except audit.DENIALS as err:  # a refusal is recorded too, with nothing started
        audit.denied(home, actor=actor, action=f"{workload.kind.value}.launch", target=workload.name,
                     reason=str(err), tenant=workload.tenant.tenant,
                     detail={"lane": workload.lane, "resources": workload.resources.as_ray()})
        raise
    record = RunRecord(id=record_id or new_record_id(workload.kind.value), workload=workload, status="admitted",
                       actor=actor, admitted_at=time.time(), within=within, queued_at=queued_at,
                       queue_wait_s=queue_wait_s, attempt=attempt, preemptions=list(preemptions or []))
    _write(home, record)
    handle = RunHandle(home, record)
    try:
        if connect is not None:
            connect()
        record.ray_job_id = _current_ray_job() if own_job else None
        record.status, record.started_at = "running", time.time()
        _write(home, record)
        handle.event("run", "run")
        result = run(handle)
    except Preempted as err:  # it made room when asked: not a failure, and it resumes under the same id
        record.status, record.finished_at = "preempted", time.time()
        record.error = None
        record.refs["preempted_at_step"] = str(err.step)
        _write(home, record)
        raise
    except BaseException as err:
        record.status, record.finished_at = "failed", time.time()
        record.error = error_line(err)[:500]
        _write(home, record)
        if record.started_at is not None:
            handle.event("run_failed", "failed")
        raise
    record.status = "started" if detached else "succeeded"
    record.finished_at = None if detached else time.time()
    _write(home, record)
    return result


def update_record(home: FactoryHome, record_id: str, **fields: Any) -> RunRecord | None:
    """Set ``fields`` of a run record (the queue's dispatcher ends detached records: succeeded, failed,
    queued again after a preemption); None when there is no such record."""
    try:
        record = read_record(home, record_id)
    except NotFound:
        return None
    record = record.model_copy(update=fields)
    RunRecord.model_validate(record.model_dump())
    _write(home, record)
    return record


def _current_ray_job() -> str | None:
    """The Ray job of this driver, if it is connected (work it starts is held under that job)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


__all__ = ["RunHandle", "RunRecord", "launch", "list_records", "read_record", "records_dir", "update_record"]

