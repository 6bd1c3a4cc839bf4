"""What a unit of work is and what it will hold: the :class:`Workload` description.

Each component derives a workload's resources from its own config (``TrainJob.resources()``,
``CompletionsArgs.resources()``, ``SweepSpec.resources()``, ...); this module knows none of them.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from aifactory.config import StrictModel
from aifactory.tenancy import Name, TenantRef, WorkloadKind

DEFAULT_LANE = "factory"
"""The lane of work that names none: repeatable runs under change control."""


class Resources(StrictModel):
    """Logical resources held at once, in all (a job's tasks and actors included), as Ray counts them."""

    cpu: float = Field(default=0.0, ge=0, description="Logical CPUs held at once, in all.")
    gpu: float = Field(default=0.0, ge=0, description="GPUs held at once, in all.")
    memory_bytes: int | None = Field(default=None, ge=0, description="Memory reserved through Ray, if declared.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources (e.g. pool_train).")

    @field_validator("cpu", "gpu")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return value

    @classmethod
    def per_unit(cls, units: int | float, *, cpu: float = 0.0, gpu: float = 0.0,
                 custom: dict[str, float] | None = None) -> Resources:
        """``units`` x (per-unit resources): workers, replicas or concurrent trials."""
        return cls(cpu=units * cpu, gpu=units * gpu, custom={k: units * v for k, v in (custom or {}).items()})

    def __add__(self, other: Resources) -> Resources:
        custom = dict(self.custom)
        for k, v in other.custom.items():
            custom[k] = custom.get(k, 0.0) + v
        mem = None if self.memory_bytes is None and other.memory_bytes is None else \
            (self.memory_bytes or 0) + (other.memory_bytes or 0)
        return Resources(cpu=self.cpu + other.cpu, gpu=self.gpu + other.gpu, memory_bytes=mem, custom=custom)

    def as_ray(self) -> dict[str, float]:
        """Ray's spelling (``CPU``, ``GPU``, custom names), as admission and quotas read it."""
        return {"CPU": self.cpu, "GPU": self.gpu, **self.custom}


class Workload(StrictModel):
    """One unit of work, described once, before it is launched."""

    kind: WorkloadKind = Field(description="job (other), train, serve, bench (a sweep), batch-inference, optimize, ingest.")
    tenant: TenantRef = Field(description="Who pays for it and whose quota it counts against.")
    name: str = Field(min_length=1, max_length=200,
                      description="A label people recognise: recipe, app, spec or entrypoint.")
    lane: Name = Field(default=DEFAULT_LANE, description="The lane it is queued in (default: factory).")
    resources: Resources = Field(default_factory=Resources,
                                 description="Everything it will hold at once, its tasks and actors included.")
    entrypoint: Resources | None = Field(
        default=None, description="For a job: what its driver process reserves (part of `resources`), as "
                                  "`ray job submit --entrypoint-num-cpus/--entrypoint-num-gpus`.")
    pool: str | None = Field(default=None, description="The node pool it is pinned to, if any.")
    config_hash: str | None = Field(default=None, description="Hash of the config it was built from.")

    def metadata(self) -> dict[str, str]:
        """Extra Ray job metadata this workload's driver carries (besides the tenant tags)."""
        return {"lane": self.lane, "declared_cpu": f"{self.resources.cpu:g}",
                "declared_gpu": f"{self.resources.gpu:g}"}
