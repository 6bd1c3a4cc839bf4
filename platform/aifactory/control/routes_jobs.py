"""Jobs through the control API: submit, list, get, logs, stop (through ``aifactory.jobs.Client``).

Submission tags the job with the key's tenant (an admin names the tenant); the client launches it through
``aifactory.workloads.launch`` (admission against quotas and budgets, the run record, cost events) and audits
the submission and any stop, once each.
"""

from __future__ import annotations

import os
import secrets
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from aifactory.control.app import CurrentPrincipal, not_visible, scope_tenant, state_of
from aifactory.control.guard import check_name
from aifactory.control.schemas import JobLogs, JobStopped, JobSubmit, JobSubmitted
from aifactory.exceptions import ConfigError, JobNotFound, PermissionDenied
from aifactory.jobs.client import Client, JobRecord
from aifactory.queue.view import QueueRow, queue_rows
from aifactory.registry.service import grant_env
from aifactory.security.apikeys import Principal

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, "a job's submission id"]


def _visible_job(request: Request, principal: Principal, job_id: str) -> tuple[Client, JobRecord]:
    """A client and the job if the caller may see it; 404 alike for unknown and for another tenant's job."""
    check_name("job_id", job_id)  # 400 naming `job_id` for a NUL, a slash, '..' or 200 characters
    client = state_of(request).jobs(principal)
    try:
        record = client.get(job_id)
    except JobNotFound:
        raise not_visible("job", job_id) from None
    if not principal.can_see(record.tenant):
        raise not_visible("job", job_id)
    return client, record


@router.post("/jobs", response_model=JobSubmitted, status_code=201, summary="Submit a job as your tenant")
def submit_job(body: JobSubmit, request: Request, principal: CurrentPrincipal) -> JobSubmitted:
    if principal.is_admin:
        if body.tenant is None:
            raise ConfigError("job submission", ["tenant: an admin key must name the tenant to submit for"])
        tenant = body.tenant
    else:
        if body.tenant is not None and body.tenant != principal.tenant:
            raise PermissionDenied("tenant: your API key submits only as its own tenant; omit `tenant`")
        tenant = principal.tenant
    client = state_of(request).jobs(principal, tenant=tenant, project=body.project)
    # The job registers models only through the control plane, as this tenant: a grant bound to its submission id.
    submission_id = f"raysubmit_{secrets.token_hex(8)}"
    grant = grant_env(state_of(request).home, tenant=tenant, project=body.project, submission_id=submission_id,
                      url=os.environ.get("AIFACTORY_CONTROL_URL") or str(request.base_url))
    job_id = client.submit(
        body.entrypoint,
        submission_id=submission_id,
        runtime_env={"env_vars": grant},
        workload=body.workload,
        num_cpus=body.num_cpus,
        num_gpus=body.num_gpus,
        entrypoint_num_cpus=body.entrypoint_num_cpus,
        entrypoint_num_gpus=body.entrypoint_num_gpus,
        lane=body.lane,
        memory_bytes=body.memory_bytes,
        priority=body.priority,
    )
    return JobSubmitted(id=job_id, tenant=tenant)


@router.get("/jobs", response_model=list[JobRecord], summary="Your tenant's jobs (admins: all, or ?tenant=)")
def list_jobs(
    request: Request,
    principal: CurrentPrincipal,
    response: Response,
    tenant: Annotated[str | None, Query(max_length=63, description="Admins: only this tenant's jobs.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many (the newest); "
                                "`X-Total-Count` says how many there are.")] = 1000,
) -> list[JobRecord]:
    scope = scope_tenant(principal, tenant)
    records = state_of(request).jobs(principal).list(tenant=scope)
    response.headers["X-Total-Count"] = str(len(records))
    return sorted(records, key=lambda r: r.start_time or 0, reverse=True)[:limit]


@router.get("/jobs/{job_id}", response_model=JobRecord, summary="One job")
def get_job(job_id: JobId, request: Request, principal: CurrentPrincipal) -> JobRecord:
    return _visible_job(request, principal, job_id)[1]


@router.get("/jobs/{job_id}/logs", response_model=JobLogs, summary="A job's logs (the last `tail_bytes`)")
def job_logs(job_id: JobId, request: Request, principal: CurrentPrincipal,
             tail_bytes: Annotated[int, Query(ge=1, le=4 << 20, description="At most this many bytes of the "
                                              "log's end (default 256 KiB, at most 4 MiB).")] = 256 << 10,
             ) -> JobLogs:
    client, record = _visible_job(request, principal, job_id)
    logs = client.logs(record.id)
    data = logs.encode("utf-8", "replace")
    tail = data[-tail_bytes:].decode("utf-8", "ignore")  # whole characters only
    return JobLogs(id=record.id, logs=tail, total_bytes=len(data), truncated=len(data) > tail_bytes)


@router.post("/jobs/{job_id}/stop", response_model=JobStopped, summary="Stop a job")
def stop_job(job_id: JobId, request: Request, principal: CurrentPrincipal) -> JobStopped:
    client, record = _visible_job(request, principal, job_id)
    return JobStopped(id=record.id, stopped=client.stop(record.id))


@router.get("/queue", response_model=list[QueueRow], summary="Your tenant's queue entries (admins: all, or ?tenant=)")
def list_queue(
    request: Request,
    principal: CurrentPrincipal,
    tenant: Annotated[str | None, Query(max_length=63, description="Admins: only this tenant's entries.")] = None,
    lane: Annotated[str | None, Query(max_length=63, description="Only this lane's entries.")] = None,
) -> list[QueueRow]:
    scope = scope_tenant(principal, tenant)
    if lane is not None:
        check_name("lane", lane, "job_id")  # a name of letters, digits, '-' and '_'
    return queue_rows(state_of(request).home, tenant=scope, lane=lane)


@router.post("/queue/{entry_id}/cancel", response_model=QueueRow, summary="Cancel one of your queued entries")
def cancel_queued(entry_id: JobId, request: Request, principal: CurrentPrincipal) -> QueueRow:
    from aifactory.queue.door import cancel
    from aifactory.queue.store import QueueStore

    check_name("entry_id", entry_id, "job_id")
    home = state_of(request).home
    entry = QueueStore.of(home).find(entry_id)
    if entry is None or not principal.can_see(entry.tenant):  # another tenant's id reads as unknown
        raise not_visible("queue entry", entry_id)
    cancel(home, entry_id, actor=principal.actor)
    return next(r for r in queue_rows(home, tenant=entry.tenant) if r.id == entry_id)
