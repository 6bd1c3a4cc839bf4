"""Usage records: what the collector writes to the ledger and what pricing reads.

A record says "holder H of tenant T held ``quantity`` resource-seconds of resource R (SKU S) on a node
of pool P (pricing class C) during window W". Its ``key`` is a deterministic function of the window and the holder, so writing the same
window twice (a collector restarted after a crash) is a no-op in the ledger.
"""

from __future__ import annotations

import hashlib
import re
import enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Resource(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"
    MEMORY = "memory"  # GiB
    ASIC = "asic"


class PricingClass(str, enum.Enum):
    ON_DEMAND = "on-demand"
    RESERVED = "reserved"
    SPOT = "spot"


# Ray node labels set by cluster/ (KubeRay worker groups, launcher node types): the node's pool, which is
# its price-book key, and its pricing class. Nodes without them are in DEFAULT_POOL, priced as a cluster.
POOL_LABEL = "aifactory.io/pool"
PRICING_CLASS_LABEL = "aifactory.io/pricing-class"
DEFAULT_POOL = "default"
# The serving layer's usage book: the named, detached actor to which Serve replicas push per-tenant request
# counters (aifactory.serve.usage creates and writes it); the sampler reads it to split a shared deployment
# between tenants. Named here, below both, so that metering does not import the serving layer.
SERVE_USAGE_BOOK = "aifactory-serve-usage"
SERVE_USAGE_NAMESPACE = "aifactory"
# A pool name is a Ray label value (the same rule as a Kubernetes label value).
POOL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
POOL_NAME_RULE = "a label value: letters, digits, '-', '_', '.', starting and ending with a letter or digit, at most 63 chars"


# The pseudo-tenant of capacity whose holder is not known: during a sampling outage (a gap between samples
# of several sample intervals), what a holder that ended or began unseen in the gap held there. Reports
# show it as its own line, beside ``idle`` and ``unattributed``; nobody is billed for it.
UNKNOWN = "unknown"


# SKU of resources that have no accelerator type.
SKU_CPU = "cpu"
SKU_MEMORY = "gib"
SKU_UNKNOWN_GPU = "unknown-gpu"


class UsageRecord(BaseModel):
    """Allocated (and, where measurable, used) resource-seconds of one holder in one window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_start: float = Field(description="Window start, Unix seconds.")
    window_end: float = Field(description="Window end, Unix seconds (exclusive).")
    tenant: str = Field(description="Tenant, or 'unattributed' / 'idle' / 'unknown' (a sampling outage).")
    project: str = Field(default="default", description="Project within the tenant.")
    workload: str = Field(default="other", description="WorkloadKind value of the holder's job.")
    job_id: str = Field(default="", description="Ray job id (hex) or submission id; '' for idle.")
    deployment: str = Field(default="", description="'app/deployment' for Serve replicas, else ''.")
    holder: str = Field(default="", description="Stable id of what held the resource (job, actor, task, pg).")
    resource: Resource = Field(description="Which resource: cpu, gpu, memory (GiB) or asic.")
    sku: str = Field(description="Price-book SKU: 'cpu', 'gib', or the accelerator type (H100, L4, ...).")
    region: str = Field(default="local", description="Price-book region of the node.")
    pricing_class: PricingClass = Field(
        default=PricingClass.ON_DEMAND, description="Reserved, on-demand or spot: the node's pricing class."
    )
    pool: str = Field(default=DEFAULT_POOL, min_length=1,
                      description="Node pool (the node's aifactory.io/pool label); 'default' for unlabelled nodes.")
    quantity_s: float = Field(ge=0, description="Allocated resource-seconds (CPU-s, GPU-s, GiB-s).")
    used_s: float | None = Field(default=None, ge=0, description="Used resource-seconds (CPU time; GPU: NVML "
                                 "utilisation x seconds); None = unknown.")
    gpu_memory_gib_s: float | None = Field(default=None, ge=0, description="GPU records: device memory the "
                                           "holder's processes used, GiB-seconds (NVML); None = unknown.")
    energy_j: float | None = Field(default=None, ge=0, description="GPU records: energy of the devices, in "
                                   "joules, split by the holder's share of them (NVML); None = unknown.")
    estimated: bool = Field(default=False, description="True where the meter fell back from Ray's measured "
                            "start/end times to estimated ones (e.g. the GCS actor table was unavailable).")

    @model_validator(mode="after")
    def _window(self) -> UsageRecord:
        if self.window_end <= self.window_start:
            raise ValueError(f"window_end ({self.window_end}) must be after window_start ({self.window_start})")
        return self

    @property
    def key(self) -> str:
        """Idempotency key: same window + holder + resource -> same key."""
        parts = (
            f"{self.window_start:.3f}", f"{self.window_end:.3f}", self.tenant, self.project, self.job_id,
            self.deployment, self.holder, self.resource.value, self.sku, self.region, self.pricing_class.value,
        )
        if self.pool != DEFAULT_POOL:
            # Only pooled records extend the key: records of unlabelled nodes keep the keys they had
            # before pools existed, so a collector upgraded mid-window does not write a window twice.
            parts = (*parts, self.pool)
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    @property
    def hours(self) -> float:
        return self.quantity_s / 3600.0
