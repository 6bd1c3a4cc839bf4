"""The shipped training recipes: functions that return a validated :class:`~aifactory.train.config.TrainJob`.

`factory train --recipe NAME` and `python -m jobs.train --recipe NAME` find NAME through the registry
(:mod:`aifactory.recipes`; '-' may stand for '_'). Each takes the tenant as its only argument.
"""

from __future__ import annotations

from aifactory.models.config import GPTConfig
from aifactory.tenancy import TenantRef
from aifactory.train.config import (
    CheckpointSpec, DataSpec, GateSpec, ModelSpec, OptimizerSpec, ScalingSpec, TrainJob, ValidationSpec,
)


def tiny(tenant: str = "demo") -> TrainJob:
    """A 0.4M-parameter byte-level GPT: FSDP2 + bf16-mixed on 2 CPU workers, ~2 minutes on 2 cores."""
    return TrainJob(
        tenant=TenantRef(tenant=tenant),
        data=DataSpec(batch_size=16),
        model=ModelSpec(name="tiny-gpt", gpt=GPTConfig(seq_len=128, d_model=128, n_layers=2, n_heads=4, d_ff=512)),
        precision="bf16-mixed",
        sharding="fsdp",
        scaling=ScalingSpec(num_workers=2),
        optimizer=OptimizerSpec(lr=3e-3, warmup_steps=10),
        steps=120,
        checkpoint=CheckpointSpec(every_steps=40, keep_last=2),
        validation=ValidationSpec(max_batches=8, gate=GateSpec(max_val_loss=5.0, min_improvement=0.0)),
        seed=0,
    )


def pipeline(tenant: str = "demo") -> TrainJob:
    """The `factory run` stage: the tiny model for a few steps, ending with a validated checkpoint."""
    job = tiny(tenant)
    return job.model_copy(update={
        "steps": 30,
        "optimizer": job.optimizer.model_copy(update={"warmup_steps": 5}),
        "checkpoint": CheckpointSpec(every_steps=15, keep_last=2),
        "validation": ValidationSpec(max_batches=4, gate=GateSpec(max_val_loss=5.4, min_improvement=0.0)),
    })


def bench_state_heavy(tenant: str = "bench") -> TrainJob:
    """A ~110M-parameter GPT whose weights, gradients and Adam moments (~1.8 GB in fp32) dominate a worker's
    memory; short sequences keep activations small (benchmarks/train_precision.py: FSDP2 + bf16 vs DDP + fp32)."""
    return TrainJob(
        tenant=TenantRef(tenant=tenant),
        data=DataSpec(batch_size=4),
        model=ModelSpec(name="bench-gpt", gpt=GPTConfig(seq_len=64, d_model=1024, n_layers=8, n_heads=16, d_ff=4096)),
        precision="bf16-mixed",
        sharding="fsdp",
        scaling=ScalingSpec(num_workers=2),
        optimizer=OptimizerSpec(lr=3e-4, warmup_steps=3),
        steps=12,
        checkpoint=CheckpointSpec(every_steps=12, keep_last=1),
        validation=ValidationSpec(max_batches=4, gate=GateSpec(min_improvement=None), register_validated=False),
        max_failures=0,
        seed=0,
    )
