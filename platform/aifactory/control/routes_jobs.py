"""Jobs through the control API: submit, list, get, logs, stop (through ``aifactory.jobs.Client``).

Submission tags the job with the key's tenant (an admin names the tenant); the client launches it through
``aifactory.workloads.launch`` (admission against quotas and budgets, the run record, cost events) and audits
the submission and any stop, once each.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from aifactory.control.app import CurrentPrincipal, not_visible, scope_tenant, state_of
from aifactory.control.schemas import JobLogs, JobStopped, JobSubmit, JobSubmitted
from aifactory.exceptions import ConfigError, JobNotFound, PermissionDenied
from aifactory.jobs.client import Client, JobRecord
from aifactory.security.apikeys import Principal

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, "a job's submission id"]


def _visible_job(request: Request, principal: Principal, job_id: str) -> tuple[Client, JobRecord]:
    """A client and the job if the caller may see it; 404 alike for unknown and for another tenant's job."""
    if not job_id or len(job_id) > 200:
        raise not_visible("job", job_id[:200])
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
    job_id = client.submit(
        body.entrypoint,
        workload=body.workload,
        num_cpus=body.num_cpus,
        num_gpus=body.num_gpus,
        entrypoint_num_cpus=body.entrypoint_num_cpus,
        entrypoint_num_gpus=body.entrypoint_num_gpus,
        lane=body.lane,
        memory_bytes=body.memory_bytes,
    )
    return JobSubmitted(id=job_id, tenant=tenant)


@router.get("/jobs", response_model=list[JobRecord], summary="Your tenant's jobs (admins: all, or ?tenant=)")
def list_jobs(
    request: Request,
    principal: CurrentPrincipal,
    tenant: Annotated[str | None, Query(max_length=63, description="Admins: only this tenant's jobs.")] = None,
) -> list[JobRecord]:
    scope = scope_tenant(principal, tenant)
    records = state_of(request).jobs(principal).list(tenant=scope)
    return records


@router.get("/jobs/{job_id}", response_model=JobRecord, summary="One job")
def get_job(job_id: JobId, request: Request, principal: CurrentPrincipal) -> JobRecord:
    return _visible_job(request, principal, job_id)[1]


@router.get("/jobs/{job_id}/logs", response_model=JobLogs, summary="A job's logs")
def job_logs(job_id: JobId, request: Request, principal: CurrentPrincipal) -> JobLogs:
    client, record = _visible_job(request, principal, job_id)
    return JobLogs(id=record.id, logs=client.logs(record.id))


@router.post("/jobs/{job_id}/stop", response_model=JobStopped, summary="Stop a job")
def stop_job(job_id: JobId, request: Request, principal: CurrentPrincipal) -> JobStopped:
    client, record = _visible_job(request, principal, job_id)
    return JobStopped(id=record.id, stopped=client.stop(record.id))
