"""The SDK's front door: ``aifactory.Client(address=..., tenant=...)``.

Submits through Ray's Job Submission API with the tenant tags and provenance as job metadata, and reads
jobs back with their attribution, whether they came from ``factory submit``, the SDK or plain
``ray job submit --metadata-json``. Driver jobs (a script calling ``ray.init``) are listed too.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from aifactory import audit
from aifactory.cluster.connect import ClusterAddress, apply_ray_env, resolve_address
from aifactory.config import config_hash as _config_hash
from aifactory.exceptions import ClusterUnreachable, FactoryError, JobNotFound
from aifactory.home import FactoryHome
from aifactory.provenance import code_version, whoami
from aifactory.tenancy import SLOClass, TenantRef, WorkloadKind, job_metadata, tags_from_metadata

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

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
    ) -> str:
        """Submit ``entrypoint`` tagged with this client's tenant through the launch path; returns the
        submission id.

        ``num_cpus`` / ``num_gpus``: what the job will hold at once in all, its tasks and actors included
        (what admission checks against the tenant's quota; the meter flags a job that holds more).
        ``entrypoint_num_cpus`` / ``entrypoint_num_gpus``: what its driver process reserves, part of that
        total, as ``ray job submit --entrypoint-num-cpus``.
        """
        from aifactory.workloads import DEFAULT_LANE, Resources, Workload, launch

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
                        lane=lane or DEFAULT_LANE, resources=total, entrypoint=driver,
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
        kwargs: dict[str, Any] = {}
        if entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
        if entrypoint_num_gpus is not None:
            kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
        if memory_bytes is not None:
            kwargs["entrypoint_memory"] = int(memory_bytes)

        def start(handle) -> str:
            try:
                job_id = self._jobs.submit_job(entrypoint=entrypoint, metadata=meta, runtime_env=env or None,
                                               submission_id=submission_id, **kwargs)
            except (ConnectionError, OSError) as err:
                raise ClusterUnreachable(self.address.dashboard_url, _first_line(err)) from None
            handle.ref("submission_id", job_id)
            audit.record(self.home, actor=self.actor, action="job.submit", target=job_id, tenant=self.tenant.tenant,
                         detail={"project": self.tenant.project, "workload": WorkloadKind(workload).value,
                                 "entrypoint": entrypoint[:500], "resources": total.as_ray(), "lane": spec.lane})
            return job_id

        return launch(spec, home=self.home, run=start, actor=self.actor, detached=True)

    def list(self, tenant: str | None = None) -> list[JobRecord]:
        """Every job on the cluster, newest first; only ``tenant``'s when given."""
        try:
            details = self._jobs.list_jobs()
        except (ConnectionError, OSError) as err:
            raise ClusterUnreachable(self.address.dashboard_url, _first_line(err)) from None
        records = [_record(d) for d in details]
        if tenant is not None:
            records = [r for r in records if r.tenant == tenant]
        return sorted(records, key=lambda r: r.start_time or 0.0, reverse=True)

    def get(self, job_id: str) -> JobRecord:
        for record in self.list():
            if job_id in (record.id, record.ray_job_id):
                return record
        raise JobNotFound(job_id, self.address.dashboard_url)

    def logs(self, job_id: str) -> str:
        record = self.get(job_id)
        if record.type != "SUBMISSION":
            raise FactoryError(f"job {job_id} is a driver script, not a submitted job: Ray keeps no job log for it")
        return self._jobs.get_job_logs(record.id)

    async def tail(self, job_id: str):
        """Yield log chunks of a running submission until it ends."""
        record = self.get(job_id)
        async for chunk in self._jobs.tail_job_logs(record.id):
            yield chunk

    def stop(self, job_id: str) -> bool:
        record = self.get(job_id)
        if record.type != "SUBMISSION":
            raise FactoryError(f"job {job_id} is a driver script; stop it where it runs")
        stopped = bool(self._jobs.stop_job(record.id))
        if stopped:  # a job that had already ended was not stopped by anyone: nothing to audit
            audit.record(self.home, actor=self.actor, action="job.stop", target=record.id, tenant=record.tenant,
                         detail={})
        return stopped

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobRecord:
        """Block until the job reaches a terminal status; returns its final record."""
        deadline = time.monotonic() + timeout_s
        while True:
            raw = self._jobs.get_job_status(job_id)
            status = getattr(raw, "value", str(raw))
            if status in TERMINAL:
                return self.get(job_id)
            if time.monotonic() > deadline:
                raise FactoryError(f"job {job_id} did not finish within {timeout_s:.0f} s (status {status})")
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
