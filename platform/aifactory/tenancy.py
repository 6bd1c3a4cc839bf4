"""Tenants and the tags every piece of work carries.

Every job, Train run, Serve deployment and Tune sweep carries a :class:`TenantRef` and a
:class:`WorkloadKind`. On Ray they travel as job metadata (``Dict[str, str]``): :func:`job_metadata`
writes them and :func:`tags_from_metadata` reads them back, so a job submitted with plain
``ray job submit --metadata-json '{"tenant": "t", "project": "p"}'`` is attributed exactly like one
from ``factory submit``. Work with no tenant is attributed to :data:`UNATTRIBUTED`, never dropped.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

UNATTRIBUTED = "unattributed"
"""The tenant of work that carries no tenant tag."""

IDLE = "idle"
"""The pseudo-tenant of capacity that nothing holds."""

PLATFORM_TENANT = "platform"
"""The tenant of the operators' own work (shared apps deployed without --tenant); an ordinary tenant name,
so a budget or quota can be set on it like on any other."""

UNKNOWN = "unknown"
"""The pseudo-tenant of capacity held during a meter outage by holders whose share cannot be known."""

_RESERVED = {UNATTRIBUTED, IDLE, UNKNOWN}
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (like a DNS label)"
        )
    return value


def _check_tenant(value: str) -> str:
    _check_name(value)
    if value in _RESERVED:
        raise ValueError(f"{value!r} is reserved for the cost report; choose another tenant name")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
TenantName = Annotated[str, AfterValidator(_check_tenant)]


class WorkloadKind(str, enum.Enum):
    """What a unit of work is. ``other`` is a generic job (``factory submit``, ``ray job submit``);
    ``bench`` is a sweep of benchmark trials."""

    INGEST = "ingest"
    TRAIN = "train"
    SERVE = "serve"
    BENCH = "bench"
    BATCH_INFERENCE = "batch-inference"
    OPTIMIZE = "optimize"
    OTHER = "other"


class SLOClass(str, enum.Enum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class TenantRef(BaseModel):
    """Who a piece of work belongs to: the unit of attribution, budgets and quotas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: TenantName = Field(description="The paying team: a DNS-label-like name, 1-63 chars.")
    project: Name = Field(default="default", description="A project within the tenant.")
    cost_center: Name | None = Field(default=None, description="Optional finance cost center.")

    def __str__(self) -> str:
        return f"{self.tenant}/{self.project}"


# Metadata keys. Short, stable strings: they are part of the public contract with `ray job submit`.
KEY_TENANT = "tenant"
KEY_PROJECT = "project"
KEY_COST_CENTER = "cost_center"
KEY_WORKLOAD = "workload"
KEY_SLO = "slo_class"
KEY_CONFIG_HASH = "config_hash"
KEY_CODE_VERSION = "code_version"
KEY_CODE_DIRTY = "code_dirty"
KEY_SUBMITTED_BY = "submitted_by"


class JobTags(BaseModel):
    """The attribution read back from any job's metadata; tolerant, since users submit by hand too."""

    model_config = ConfigDict(frozen=True)

    tenant: str = UNATTRIBUTED
    project: str = "default"
    cost_center: str | None = None
    workload: str = WorkloadKind.OTHER.value
    slo_class: str | None = None
    config_hash: str | None = None
    code_version: str | None = None
    code_dirty: bool | None = None
    submitted_by: str | None = None

    @property
    def attributed(self) -> bool:
        return self.tenant != UNATTRIBUTED


def job_metadata(
    tenant: TenantRef,
    *,
    workload: WorkloadKind = WorkloadKind.OTHER,
    slo_class: SLOClass | None = None,
    config_hash: str | None = None,
    code_version: str | None = None,
    code_dirty: bool | None = None,
    submitted_by: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The Ray job metadata (``Dict[str, str]``) that tags a job with its tenant and provenance."""
    meta: dict[str, str] = dict(extra or {})
    meta[KEY_TENANT] = tenant.tenant
    meta[KEY_PROJECT] = tenant.project
    if tenant.cost_center:
        meta[KEY_COST_CENTER] = tenant.cost_center
    meta[KEY_WORKLOAD] = WorkloadKind(workload).value
    if slo_class is not None:
        meta[KEY_SLO] = SLOClass(slo_class).value
    if config_hash is not None:
        meta[KEY_CONFIG_HASH] = config_hash
    if code_version is not None:
        meta[KEY_CODE_VERSION] = code_version
    if code_dirty is not None:
        meta[KEY_CODE_DIRTY] = "true" if code_dirty else "false"
    if submitted_by is not None:
        meta[KEY_SUBMITTED_BY] = submitted_by
    return meta


def tags_from_metadata(metadata: Mapping[str, str] | None) -> JobTags:
    """Attribution of a job from its metadata. Missing or invalid tenants become ``unattributed``."""
    meta = dict(metadata or {})
    tenant = str(meta.get(KEY_TENANT, "")).strip()
    if not tenant or not _NAME_RE.match(tenant) or tenant in _RESERVED:
        tenant = UNATTRIBUTED
    project = str(meta.get(KEY_PROJECT, "") or "default").strip()
    dirty = meta.get(KEY_CODE_DIRTY)
    return JobTags(
        tenant=tenant,
        project=project if _NAME_RE.match(project) else "default",
        cost_center=meta.get(KEY_COST_CENTER) or None,
        workload=meta.get(KEY_WORKLOAD) or WorkloadKind.OTHER.value,
        slo_class=meta.get(KEY_SLO) or None,
        config_hash=meta.get(KEY_CONFIG_HASH) or None,
        code_version=meta.get(KEY_CODE_VERSION) or None,
        code_dirty=None if dirty is None else dirty.lower() == "true",
        submitted_by=meta.get(KEY_SUBMITTED_BY) or None,
    )
