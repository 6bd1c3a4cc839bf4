"""The SDK's front door: ``aifactory.Client(address=..., tenant=...)``.

``submit`` queues the job in the tenant job queue (:mod:`aifactory.queue`: refusals at once, the durable
queue, lanes and priorities), runs one dispatch pass inline, so work that fits starts at once as before,
and returns the entry's id at once; the dispatcher submits the rest through Ray's Job Submission API with
the tenant tags and provenance as job metadata when its turn comes. Jobs are read back with their
attribution, whether they came from ``factory submit``, the SDK or plain ``ray job submit
--metadata-json``; a queued entry reads ``QUEUED`` until it is dispatched. Driver jobs (a script calling
``ray.init``) are listed too.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from aifactory import audit
from aifactory.cluster.connect import ClusterAddress, apply_ray_env, resolve_address
from aifactory.config import config_hash as _config_hash
from aifactory.exceptions import ClusterUnreachable, FactoryError, JobNotFound
from aifactory.home import FactoryHome
from aifactory.provenance import code_version, whoami
from aifactory.tenancy import SLOClass, TenantRef, WorkloadKind, job_metadata, tags_from_metadata

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED", "CANCELLED")
QUEUED = "QUEUED"

class JobRecord(BaseModel):
    """One job on the cluster with its attribution."""

    id: str
    ray_job_id: str | None
    type: str
    status: str
    tenant: str
    project: str
    workload: str
    entrypoint: str | None
    start_time: float | None
    end_time: float | None
    metadata: dict[str, str]
    message: str | None = None
    submission_id: str | None = Field(default=None, description="The Ray submission id of its current attempt "
                                                                "(None while it is queued).")
    lane: str | None = Field(default=None, description="The queue lane it went through (None: not queued).")
    queue_state: str | None = Field(default=None, description="Its state in the queue (queued, running, ...).")
    queue_reason: str | None = Field(default=None, description="Why it waits, or how it ended, in the queue.")
    queued_at: float | None = Field(default=None, description="When it was queued.")
    queue_wait_s: float | None = Field(default=None, description="Seconds it waited in the queue so far.")
    preemptions: int = Field(default=0, description="How often the queue asked it to yield.")

    @property
    def age_s(self) -> float | None:
        return None if self.start_time is None else max(0.0, time.time() - self.start_time)

    @property
    def duration_s(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time


class Client:
    """Jobs on one Ray cluster, seen as one tenant (or as an operator, with ``tenant=None``)."""

    def __init__(
        self,
        address: str | ClusterAddress | None = None,
        tenant: str | TenantRef | None = None,
        project: str = "default",
        *,
        home: FactoryHome | None = None,
        actor: str | None = None,
    ):
        self.home = home or FactoryHome.from_env()
        # Who the audit log names for submissions and stops: the OS user, or the control API's caller.
        self.actor = actor or whoami()
        if isinstance(tenant, str):
            tenant = TenantRef(tenant=tenant, project=project)
        self.tenant = tenant
        resolved = address if isinstance(address, ClusterAddress) else resolve_address(self.home, address)
        if resolved is None:
            raise ClusterUnreachable("(no address)", "no --address, no RAY_ADDRESS and no `factory up` cluster")
        self.address = resolved
        apply_ray_env(self.home)
        from ray.job_submission import JobSubmissionClient

        try:
            self._jobs = JobSubmissionClient(self.address.dashboard_url)
        except (ConnectionError, RuntimeError, OSError) as err:
            raise ClusterUnreachable(self.address.dashboard_url, _first_line(err)) from None

    def submit(
        self,
        entrypoint: str | Sequence[str],
        *,
        workload: WorkloadKind = WorkloadKind.OTHER,
        slo_class: SLOClass | None = None,
        working_dir: str | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        memory_bytes: int | None = None,
        lane: str | None = None,
        config: BaseModel | Mapping[str, Any] | None = None,
        submission_id: str | None = None,
        extra_metadata: Mapping[str, str] | None = None,
        priority: int | None = None,
        expected_runtime_s: float | None = None,
    ) -> str:
        """Queue ``entrypoint`` tagged with this client's tenant, start it now if it fits; returns its id (the
        queue entry's, which is also its first Ray submission id).

        Refused at once (nothing queued): an unknown ``lane``, a tenant the lane does not allow, a ``priority``
        outside the lane's range, a request above a quota limit by itself, more than the whole cluster, a
        tenant over its hard budget, or a quota while the meter is not fresh. ``submission_id``: the entry's
        id (default: a generated ``job-...``). ``expected_runtime_s``: for the queue's ETAs.

        ``num_cpus`` / ``num_gpus``: what the job will hold at once in all, its tasks and actors included
        (what admission checks against the tenant's quota; the meter flags a job that holds more).
        ``entrypoint_num_cpus`` / ``entrypoint_num_gpus``: what its driver process reserves, part of that
        total, as ``ray job submit --entrypoint-num-cpus``.
        """
        from aifactory.queue.door import enqueue
        from aifactory.queue.lanes import load_lanes
        from aifactory.workloads import Resources, Workload

        if self.tenant is None:
            raise FactoryError("a tenant is required to submit work: pass tenant= (CLI: --tenant)")
        if not isinstance(entrypoint, str):
            entrypoint = shlex.join(entrypoint)
        if not entrypoint.strip():
            raise FactoryError("the entrypoint is empty: give the command after `--`")
        driver = Resources(cpu=float(entrypoint_num_cpus or 0), gpu=float(entrypoint_num_gpus or 0),
                           memory_bytes=memory_bytes)
        total = Resources(cpu=max(float(num_cpus or 0), driver.cpu), gpu=max(float(num_gpus or 0), driver.gpu),
                          memory_bytes=memory_bytes)
        spec = Workload(kind=WorkloadKind(workload), tenant=self.tenant, name=entrypoint[:200],
                        lane=load_lanes(self.home).lane_of(self.tenant.tenant, lane), resources=total,
                        entrypoint=driver,
                        config_hash=_config_hash(config) if config is not None else None)
        code = code_version()
        meta = job_metadata(
            self.tenant,
            workload=workload,
            slo_class=slo_class,
            config_hash=spec.config_hash,
            code_version=code.sha,
            code_dirty=code.dirty,
            submitted_by=self.actor,
            extra={**spec.metadata(), **dict(extra_metadata or {})},
        )
        env = dict(runtime_env or {})
        if working_dir:
            env["working_dir"] = working_dir
            env.setdefault("excludes", [".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache"])
        job: dict[str, Any] = {"entrypoint": entrypoint, "metadata": meta, "runtime_env": env or None}
        if entrypoint_num_cpus is not None:
            job["entrypoint_num_cpus"] = entrypoint_num_cpus
        if entrypoint_num_gpus is not None:
            job["entrypoint_num_gpus"] = entrypoint_num_gpus
        if memory_bytes is not None:
            job["entrypoint_memory"] = int(memory_bytes)
        view = self._view()
        try:
            snap = view.read()
        except Exception:  # noqa: BLE001 - the size check needs the capacity; the dispatcher re-checks at start
            snap = None
        entry = enqueue(self.home, spec, payload={"job": job}, actor=self.actor, priority=priority,
                        capacity=snap[0] if snap else None, entry_id=submission_id,
                        expected_runtime_s=expected_runtime_s)
        meta["lane"] = entry.lane
        audit.record(self.home, actor=self.actor, action="job.submit", target=entry.id, tenant=self.tenant.tenant,
                     detail={"project": self.tenant.project, "workload": WorkloadKind(workload).value,
                             "entrypoint": entrypoint[:500], "resources": total.as_ray(), "lane": entry.lane,
                             "priority": entry.priority})
        self.dispatch(view=view)  # work that fits starts now, as before the queue
        return entry.id

    def _view(self):
        from aifactory.cluster.connect import auth_headers
        from aifactory.queue.dispatcher import DashboardView

        return DashboardView(self.address.dashboard_url, auth_headers())

    def dispatch(self, *, view=None, lock_timeout_s: float = 10.0):
        """One dispatch pass of the queue (:func:`aifactory.queue.dispatcher.dispatch_once`); the dispatcher
        actor runs one every second, this one runs now."""
        from aifactory.queue.dispatcher import dispatch_once

        try:
            return dispatch_once(self.home, client=self._jobs, view=view or self._view(),
                                 lock_timeout_s=lock_timeout_s)
        except (ConnectionError, OSError) as err:
            raise ClusterUnreachable(self.address.dashboard_url, _first_line(err)) from None

    def _store(self):
        from aifactory.queue.store import QueueStore, queue_path

        return QueueStore.of(self.home) if queue_path(self.home).is_file() else None

    def _entry(self, job_id: str):
        store = self._store()
        return None if store is None else store.find_submission(job_id)

    def _entry_record(self, entry, details: Any | None = None) -> JobRecord:
        """The job record of a queue entry: Ray's record of its current attempt, or QUEUED / CANCELLED."""
        from aifactory.queue.store import WAITING

        queue = {"lane": entry.lane, "queue_state": entry.state, "queue_reason": entry.reason,
                 "queued_at": entry.enqueued_at, "queue_wait_s": entry.queue_wait_s,
                 "preemptions": len(entry.preemptions), "submission_id": entry.submission_id}
        if details is None and entry.submission_id and entry.state not in WAITING:
            try:
                details = self._jobs.get_job_info(entry.submission_id)
            except (RuntimeError, ValueError):
                details = None
            except (ConnectionError, OSError) as err:
                raise ClusterUnreachable(self.address.dashboard_url, _first_line(err)) from None
        if details is not None and entry.state not in WAITING:
            rec = _record(details)
            status = rec.status
            if entry.state == "preempting" and status in TERMINAL:
                status = QUEUED  # it yielded and goes back to the queue
            return rec.model_copy(update={"id": entry.id, "status": status, **queue})
        status = {"cancelled": "CANCELLED", "failed": "FAILED", "stopped": "STOPPED",
                  "succeeded": "SUCCEEDED"}.get(entry.state, QUEUED)
        wl = entry.payload.get("workload", {})
        meta = (entry.payload.get("job") or {}).get("metadata") or {}
        return JobRecord(id=entry.id, ray_job_id=None, type="SUBMISSION", status=status, tenant=entry.tenant,
                         project=entry.project, workload=str(wl.get("kind", entry.kind)),
                         entrypoint=(entry.payload.get("job") or {}).get("entrypoint"), start_time=None,
                         end_time=entry.finished_at, metadata=dict(meta), message=entry.reason, **queue)

    def list(self, tenant: str | None = None) -> list[JobRecord]:
        """Every job on the cluster and every queue entry, newest first (an entry once, as its current
        attempt or as QUEUED / CANCELLED); only ``tenant``'s when given."""
        try:
            details = self._jobs.list_jobs()
        except (ConnectionError, OSError) as err:
            raise ClusterUnreachable(self.address.dashboard_url, _first_line(err)) from None
        from aifactory.queue.store import submission_id

        store = self._store()
        entries = {e.id: e for e in (store.list(tenant=tenant) if store is not None else [])}
        attempt_of = {submission_id(e.id, n): e for e in entries.values() for n in range(1, e.attempts + 1)}
        records, shown = [], set()
        for d in details:
            entry = attempt_of.get(d.submission_id or "")
            if entry is None:
                records.append(_record(d))
            elif entry.submission_id == d.submission_id and entry.state not in ("queued", "dispatching"):
                records.append(self._entry_record(entry, d))
                shown.add(entry.id)
            # else: an earlier attempt of an entry, which is listed once, as its current one
        records += [self._entry_record(e) for i, e in entries.items() if i not in shown]
        if tenant is not None:
            records = [r for r in records if r.tenant == tenant]
        return sorted(records, key=lambda r: r.start_time or r.queued_at or 0.0, reverse=True)

    def get(self, job_id: str) -> JobRecord:
        entry = self._entry(job_id)
        if entry is not None:
            return self._entry_record(entry)
        for record in self.list():
            if job_id in (record.id, record.ray_job_id):
                return record
        raise JobNotFound(job_id, self.address.dashboard_url)

    def logs(self, job_id: str) -> str:
        record = self.get(job_id)
        if record.type != "SUBMISSION":
            raise FactoryError(f"job {job_id} is a driver script, not a submitted job: Ray keeps no job log for it")
        if record.status == QUEUED and record.submission_id is None:
            return ""
        return self._jobs.get_job_logs(record.submission_id or record.id)

    async def tail(self, job_id: str):
        """Yield log chunks of a running submission until it ends (a queued one: once it starts)."""
        while (record := self.get(job_id)).queue_state in ("queued", "dispatching"):
            self.dispatch(lock_timeout_s=0.0)
            await asyncio.sleep(0.5)
        async for chunk in self._jobs.tail_job_logs(record.submission_id or record.id):
            yield chunk

    def stop(self, job_id: str) -> bool:
        """Stop a job; a queued entry is cancelled (it never starts)."""
        entry = self._entry(job_id)
        if entry is not None and entry.state == "queued":
            from aifactory.queue.door import cancel

            cancel(self.home, entry.id, actor=self.actor)
            return True
        record = self.get(job_id)
        if record.type != "SUBMISSION":
            raise FactoryError(f"job {job_id} is a driver script; stop it where it runs")
        if entry is not None:  # a stop by its owner is final: the dispatcher must not re-queue it as a yield
            self._store().transition(entry.id, ("running", "preempting", "dispatching"), entry.state,
                                     payload={**entry.payload, "stop_requested": True})
        stopped = bool(self._jobs.stop_job(record.submission_id or record.id))
        if stopped:  # a job that had already ended was not stopped by anyone: nothing to audit
            audit.record(self.home, actor=self.actor, action="job.stop", target=record.id, tenant=record.tenant,
                         detail={})
        return stopped

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobRecord:
        """Block until the job reaches a terminal status; returns its final record. A queued entry is waited
        for through its dispatch (this client runs passes too, so it needs no dispatcher actor) and across
        preemptions: it ends when its last attempt ends."""
        deadline = time.monotonic() + timeout_s
        while True:
            entry = self._entry(job_id)
            if entry is None:
                raw = self._jobs.get_job_status(job_id)
                status = getattr(raw, "value", str(raw))
                if status in TERMINAL:
                    return self.get(job_id)
            else:
                status = entry.state
                if entry.state in ("succeeded", "failed", "stopped", "cancelled"):
                    return self.get(job_id)
                if entry.state in ("running", "preempting"):
                    raw = getattr(self._jobs.get_job_status(entry.submission_id), "value", None)
                    if raw in TERMINAL:  # reconcile now (or the actor's pass that holds the lock does)
                        self.dispatch(lock_timeout_s=2.0)
                        continue_ = self._entry(job_id)
                        if continue_ is not None and continue_.state in ("succeeded", "failed", "stopped"):
                            return self.get(job_id)
                else:
                    self.dispatch(lock_timeout_s=0.0)
            if time.monotonic() > deadline:
                why = f"; it waits because: {entry.reason}" if entry is not None and entry.reason else ""
                raise FactoryError(f"job {job_id} did not finish within {timeout_s:.0f} s (status {status}){why}")
            time.sleep(poll_s)


def _record(d: Any) -> JobRecord:
    tags = tags_from_metadata(d.metadata)
    job_type = getattr(d.type, "value", str(d.type)).upper()
    return JobRecord(
        id=d.submission_id or d.job_id,
        ray_job_id=d.job_id,
        type=job_type,
        status=getattr(d.status, "value", str(d.status)),
        tenant=tags.tenant,
        project=tags.project,
        workload=tags.workload,
        entrypoint=d.entrypoint,
        start_time=d.start_time / 1000 if d.start_time else None,
        end_time=d.end_time / 1000 if d.end_time else None,
        metadata=dict(d.metadata or {}),
        message=d.message,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
