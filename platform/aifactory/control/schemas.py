"""Request and response bodies of the control API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from aifactory.config import StrictModel
from aifactory.tenancy import Name, TenantName, WorkloadKind


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable error kind, e.g. not_found, unauthenticated, invalid_request.")
    message: str = Field(description="What was wrong and what to do.")
    fields: list[str] = Field(default_factory=list, description="The request fields at fault, if any.")


class ErrorBody(BaseModel):
    error: ErrorDetail = Field(description="The error.")


class WhoAmI(BaseModel):
    key_id: str = Field(description="The API key's id.")
    tenant: str | None = Field(description="The tenant the key acts for (null for admin keys).")
    role: str = Field(description="tenant or admin.")
    name: str = Field(description="The key's label.")


class JobSubmit(StrictModel):
    entrypoint: str = Field(min_length=1, max_length=10_000, description="The shell command the job runs.")
    project: Name = Field(default="default", description="Project within the tenant.")
    tenant: TenantName | None = Field(
        default=None,
        description="Admins only: the tenant to submit for. Tenant keys always submit as their own tenant; "
        "another tenant here is refused.",
    )
    workload: WorkloadKind = Field(default=WorkloadKind.OTHER, description="What kind of work this is.")
    num_cpus: float | None = Field(default=None, ge=0, le=4096,
                                   description="CPUs the job will hold at once in all, its tasks and actors included "
                                               "(checked against the tenant's quota).")
    num_gpus: float | None = Field(default=None, ge=0, le=1024,
                                   description="GPUs the job will hold at once in all (checked against the quota).")
    entrypoint_num_cpus: float | None = Field(default=None, ge=0, le=4096,
                                              description="CPUs the driver process reserves (part of num_cpus).")
    entrypoint_num_gpus: float | None = Field(default=None, ge=0, le=1024,
                                              description="GPUs the driver process reserves (part of num_gpus).")
    lane: Name | None = Field(default=None, description="The lane to queue in (default: the tenant's in lanes.yaml, "
                                                         "else factory).")
    priority: int | None = Field(default=None, ge=0, le=1000,
                                 description="Priority within the lane (default: the lane's default_priority); "
                                             "outside the lane's range: 422 naming `priority`.")
    memory_bytes: int | None = Field(default=None, ge=0, le=1 << 50, description="Memory reserved, in bytes.")


class JobSubmitted(BaseModel):
    id: str = Field(description="The job's id: its queue entry, and its first Ray submission id.")
    tenant: str = Field(description="The tenant the job was tagged with (from the API key).")


class JobLogs(BaseModel):
    id: str = Field(description="The job.")
    logs: str = Field(description="The job's log so far: its last `tail_bytes` bytes.")
    total_bytes: int = Field(default=0, description="The whole log's size in bytes.")
    truncated: bool = Field(default=False, description="True if `logs` holds only the end of the log.")


class JobStopped(BaseModel):
    id: str = Field(description="The job.")
    stopped: bool = Field(description="True if a stop was requested; false if the job had already ended.")


class LimitsUpdate(StrictModel):
    budget: dict[str, Any] | None = Field(default=None, description="Budget: {period, soft_usd, hard_usd}.")
    quota: dict[str, Any] | None = Field(default=None, description="Quota held at once: {cpu, gpu} over all pools, and pools: {POOL: {cpu, gpu}}.")


class KeyCreate(StrictModel):
    tenant: TenantName | None = Field(default=None, description="The tenant the key acts for (omit for admin).")
    role: str = Field(default="tenant", pattern="^(tenant|admin)$", description="tenant or admin.")
    name: str = Field(default="default", min_length=1, max_length=64, description="A label for the key.")


class KeyRotate(StrictModel):
    grace_s: float = Field(default=0.0, ge=0, le=30 * 86400, description="Seconds the old key keeps working.")


class Key(BaseModel):
    key_id: str
    tenant: str | None
    role: str
    name: str
    created_at: float
    created_by: str
    revoked_at: float | None
    rotated_to: str | None
    active: bool


class IssuedKey(Key):
    key: str = Field(description="The secret key: shown once, store it now.")


class AuditRecord(BaseModel):
    seq: int
    ts: float
    actor: str
    action: str
    target: str
    tenant: str | None
    detail: dict[str, Any]
    hash: str
