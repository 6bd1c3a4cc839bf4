"""Lanes: where work queues, at what priority, with which quotas, preemption and retention.

Read from ``<home>/lanes.yaml`` (the defaults below when the file is absent)::

    lanes:
      factory:  {priority: 100, preemption: {preemptible: false}, guaranteed_share: 0.25, change_control: true}
      learning: {priority: 10, preemption: {preemptible: true, grace_s: 10}, max_share: 0.75,
                 tenant_quota: {cpu: 8}, retention: {checkpoints_days: 7, results_days: 14}}
    tenant_weights: {search: 2}      # fair-share weights (default 1)
    tenant_lanes: {research: learning}   # the lane of work that names none (default: factory)
    reservation_age_s: 60            # a blocked head older than this reserves what it needs (no backfill)
    usage_half_life_s: 300           # half-life of the past usage that fair share orders by

Every field is validated when the file is read; a bad file raises one :class:`~aifactory.exceptions.ConfigError`
that names each bad field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, FiniteFloat, model_validator

from aifactory.config import StrictModel, parse_config, read_yaml
from aifactory.tenancy import Name, TenantName
from aifactory.workloads.spec import DEFAULT_LANE


class LaneQuota(StrictModel):
    """Most resources held at once by work of this lane (per tenant, or per pool)."""

    cpu: FiniteFloat | None = Field(default=None, ge=0, description="Most logical CPUs held at once.")
    gpu: FiniteFloat | None = Field(default=None, ge=0, description="Most GPUs held at once.")

    def limits(self) -> dict[str, float]:
        """Ray's spelling (``CPU``, ``GPU``) of the limits that are set."""
        return {k: v for k, v in (("CPU", self.cpu), ("GPU", self.gpu)) if v is not None}


class PreemptionPolicy(StrictModel):
    """Whether running work of the lane may be asked to yield to a higher lane, and how long it gets."""

    preemptible: bool = Field(default=False, description="Running work here may be preempted by a higher, "
                                                         "non-preemptible lane's work that cannot start otherwise.")
    grace_s: FiniteFloat = Field(default=30.0, ge=0, le=3600,
                                 description="Seconds between asking a job to yield (a training run checkpoints "
                                             "and exits) and `ray job stop`.")


class RetentionPolicy(StrictModel):
    """How long the lane's outputs are kept (None: forever)."""

    checkpoints_days: FiniteFloat | None = Field(default=None, gt=0, description="Days a run's checkpoints are kept.")
    results_days: FiniteFloat | None = Field(default=None, gt=0, description="Days results and logs are kept.")
    queue_days: FiniteFloat = Field(default=30.0, gt=0, description="Days finished queue entries are kept.")


class Lane(StrictModel):
    """One lane of the queue."""

    priority: int = Field(ge=0, le=1000, description="The lane's rank: work of a higher lane is ordered first.")
    min_priority: int = Field(default=0, ge=0, le=1000, description="Lowest priority an entry may ask for here.")
    max_priority: int = Field(default=100, ge=0, le=1000, description="Highest priority an entry may ask for here.")
    default_priority: int = Field(default=50, ge=0, le=1000, description="An entry's priority when it names none.")
    preemption: PreemptionPolicy = Field(default_factory=PreemptionPolicy,
                                         description="Whether the lane's running work may be asked to yield.")
    guaranteed_share: FiniteFloat = Field(default=0.0, ge=0, le=1,
                                          description="Fraction of the cluster other lanes' queued work may not "
                                                      "take while this lane holds less.")
    max_share: FiniteFloat = Field(default=1.0, gt=0, le=1,
                                   description="Most of the cluster (dominant resource) the lane's work holds at once.")
    tenant_quota: LaneQuota = Field(default_factory=LaneQuota, description="Per tenant: most held at once here.")
    pool_quota: dict[Name, LaneQuota] = Field(default_factory=dict,
                                              description="Per node pool: most the lane's work pinned to it holds.")
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy, description="How long outputs are kept.")
    allowed_tenants: list[TenantName] | None = Field(default=None,
                                                     description="Tenants that may queue here (None: every tenant).")
    change_control: bool = Field(default=False,
                                 description="Only work whose name matches `templates` (registered recipes, "
                                             "specs or entrypoint templates) may run here.")
    templates: list[str] = Field(default_factory=lambda: ["*"],
                                 description="fnmatch patterns over the workload's name (a recipe, spec or the "
                                             "entrypoint) admitted under change control; narrow them per site.")

    @model_validator(mode="after")
    def _ranges(self) -> Lane:
        problems = []
        if self.min_priority > self.max_priority:
            problems.append(f"min_priority ({self.min_priority}) must not exceed max_priority ({self.max_priority})")
        if not self.min_priority <= self.default_priority <= self.max_priority:
            problems.append(f"default_priority ({self.default_priority}) must lie in [min_priority "
                            f"{self.min_priority}, max_priority {self.max_priority}]")
        if self.guaranteed_share > self.max_share:
            problems.append(f"guaranteed_share ({self.guaranteed_share}) must not exceed max_share ({self.max_share})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def default_lanes() -> dict[str, Lane]:
    """``factory``: repeatable, change-controlled, never preempted; ``learning``: experiments, preemptible,
    capped at 3/4 of the cluster, shorter retention, a more permissive quota (none by default)."""
    return {
        "factory": Lane(priority=100, preemption=PreemptionPolicy(preemptible=False), guaranteed_share=0.25,
                        change_control=True, retention=RetentionPolicy(checkpoints_days=90, results_days=365)),
        "learning": Lane(priority=10, preemption=PreemptionPolicy(preemptible=True, grace_s=10.0), max_share=0.75,
                         retention=RetentionPolicy(checkpoints_days=7, results_days=14, queue_days=7)),
    }


class LanesConfig(StrictModel):
    """``<home>/lanes.yaml``: the lanes and the rules the dispatcher orders work by."""

    lanes: dict[Name, Lane] = Field(default_factory=default_lanes, description="Lane name -> its policy.")
    tenant_weights: dict[TenantName, FiniteFloat] = Field(
        default_factory=dict, description="Fair-share weight per tenant (default 1): share = decayed usage / weight.")
    tenant_lanes: dict[TenantName, Name] = Field(default_factory=dict,
                                                 description="A tenant's default lane (else `factory`).")
    reservation_age_s: FiniteFloat = Field(default=60.0, ge=0,
                                           description="A blocked entry waiting longer than this reserves the free "
                                                       "resources it needs: no smaller work may backfill them.")
    usage_half_life_s: FiniteFloat = Field(default=300.0, gt=0,
                                           description="Half-life of the past usage fair share is computed over.")
    default_runtime_s: FiniteFloat = Field(default=60.0, gt=0,
                                           description="Runtime assumed for ETAs when no finished entry of the "
                                                       "same name says better.")

    @model_validator(mode="after")
    def _references(self) -> LanesConfig:
        problems = [f"tenant_weights.{t}: must be > 0 (got {w})" for t, w in self.tenant_weights.items() if w <= 0]
        problems += [f"tenant_lanes.{t}: no lane {lane!r} (lanes: {sorted(self.lanes)})"
                     for t, lane in self.tenant_lanes.items() if lane not in self.lanes]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def weight(self, tenant: str) -> float:
        return float(self.tenant_weights.get(tenant, 1.0))

    def lane_of(self, tenant: str, lane: str | None) -> str:
        """The lane work goes to: the one it names, else the tenant's default, else ``factory``."""
        return lane or self.tenant_lanes.get(tenant) or DEFAULT_LANE


def lanes_path(home) -> Path:
    return home.root / "lanes.yaml"


def load_lanes(home) -> LanesConfig:
    """The home's lanes (the defaults when ``lanes.yaml`` is absent)."""
    path = lanes_path(home)
    if not path.is_file():
        return LanesConfig()
    return parse_config(LanesConfig, read_yaml(path), source=str(path))


__all__ = ["Lane", "LaneQuota", "LanesConfig", "PreemptionPolicy", "RetentionPolicy", "default_lanes", "lanes_path",
           "load_lanes"]
