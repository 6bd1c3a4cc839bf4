"""The typed config of a training job: one :class:`TrainJob` tree, validated before anything starts.

Ray Train's ``train_loop_config`` is a dict: :meth:`TrainJob.model_dump` at that boundary, and the worker
validates it again on its first line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aifactory.config import StrictModel
from aifactory.models.config import GPTConfig
from aifactory.tenancy import Name, TenantRef

Precision = Literal["fp32", "bf16-mixed"]
Sharding = Literal["ddp", "fsdp"]


class DataSpec(StrictModel):
    dataset_version: str | None = Field(
        default=None, description="Dataset version from the data plane's store; None = the newest at submit time."
    )
    batch_size: int = Field(default=16, ge=1, le=65536, description="Sequences per step per worker.")
    prefetch_batches: int = Field(default=2, ge=0, le=64, description="Batches the Ray Data feed prefetches.")


class ModelSpec(StrictModel):
    name: Name = Field(default="tiny-gpt", description="Registry name that validated checkpoints are registered under.")
    gpt: GPTConfig = Field(default_factory=GPTConfig, description="Shape of the decoder-only transformer.")


class ScalingSpec(StrictModel):
    num_workers: int = Field(default=2, ge=1, le=1024, description="Ray Train workers (one process each).")
    use_gpu: bool | None = Field(
        default=None, description="True/False forces the device; None chooses at run time (GPU when the cluster has one)."
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Logical CPUs each worker reserves.")

    def resources(self, *, use_gpu: bool):
        """What the run holds at once: workers x (CPUs per worker + one GPU each when on GPUs)."""
        from aifactory.workloads.spec import Resources

        return Resources.per_unit(self.num_workers, cpu=self.cpus_per_worker, gpu=1.0 if use_gpu else 0.0)


class OptimizerSpec(StrictModel):
    lr: float = Field(default=3e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Final learning rate as a fraction of lr (cosine).")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW decoupled weight decay (matrices only).")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Global gradient-norm clip; None disables it.")


class CheckpointSpec(StrictModel):
    every_steps: int = Field(default=20, ge=1, description="Checkpoint (and validate) every K steps and at the end.")
    keep_last: int = Field(default=2, ge=1, description="Checkpoints Ray Train keeps (older ones are deleted).")
    storage_path: str | None = Field(
        default=None, description="Ray Train storage_path (local path or pyarrow/fsspec URI); None = the factory home's."
    )


class GateSpec(StrictModel):
    """When a checkpoint counts as *validated* (and is registered): every set condition must hold."""

    max_val_loss: float | None = Field(default=None, gt=0, description="Validation loss must be below this.")
    min_improvement: float | None = Field(
        default=0.0, ge=0,
        description="Validation loss must beat the previous validated checkpoint's by at least this; None disables.",
    )


class ValidationSpec(StrictModel):
    max_batches: int = Field(default=8, ge=1, description="Validation batches per worker per checkpoint.")
    gate: GateSpec = Field(default_factory=GateSpec, description="The quality gate a checkpoint must pass.")
    register_validated: bool = Field(default=True, description="Register validated checkpoints in the model registry.")


class FaultSpec(StrictModel):
    """Deliberate failures, for testing recovery (a worker SIGKILLs its own process once)."""

    kill_rank: int | None = Field(default=None, ge=0, description="Rank whose process is killed.")
    kill_at_step: int | None = Field(default=None, ge=1, description="Step at which it is killed (first attempt only).")


class TrainJob(StrictModel):
    """A training run: tenant, data, model, precision, sharding, scaling, optimizer, checkpoints, gate, seed."""

    tenant: TenantRef = Field(description="Who the run belongs to (attribution, budgets).")
    data: DataSpec = Field(default_factory=DataSpec, description="Which dataset version and how it is fed.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model name and shape.")
    precision: Precision = Field(
        default="bf16-mixed", description="fp32, or bf16-mixed (bf16 parameters/compute, fp32 master weights and reduction)."
    )
    sharding: Sharding = Field(default="fsdp", description="fsdp (FSDP2 fully_shard per block) or ddp.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers and device.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="AdamW and its schedule.")
    steps: int = Field(default=60, ge=1, le=10_000_000, description="Optimizer steps in the run.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="DCP checkpoint cadence and storage.")
    validation: ValidationSpec = Field(default_factory=ValidationSpec, description="Validation and the quality gate.")
    max_failures: int = Field(default=1, ge=0, description="Worker-group restarts Ray Train allows (FailureConfig).")
    seed: int = Field(default=0, ge=0, description="Seeds initialisation and the data order.")
    faults: FaultSpec = Field(default_factory=FaultSpec, description="Fault injection for recovery tests.")

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainJob:
        problems = []
        if self.checkpoint.every_steps > self.steps:
            problems.append(
                f"checkpoint.every_steps ({self.checkpoint.every_steps}) exceeds steps ({self.steps}); "
                "the run would only checkpoint at the end"
            )
        if self.optimizer.warmup_steps >= self.steps:
            problems.append(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be below steps ({self.steps})")
        if (self.faults.kill_rank is None) != (self.faults.kill_at_step is None):
            problems.append("faults.kill_rank and faults.kill_at_step go together: set both or neither")
        if self.faults.kill_rank is not None and self.faults.kill_rank >= self.scaling.num_workers:
            problems.append(
                f"faults.kill_rank ({self.faults.kill_rank}) must be below scaling.num_workers ({self.scaling.num_workers})"
            )
        if self.faults.kill_rank is not None and self.max_failures < 1:
            problems.append("faults.kill_rank needs max_failures >= 1, or the run fails instead of resuming")
        if problems:
            raise ValueError("; ".join(problems))
        return self
