"""Sweep recipes: functions returning typed :class:`~aifactory.bench.spec.SweepSpec` s.

Run one with ``factory bench run smoke --tenant demo`` (or a YAML file: ``factory bench run
benchmarks/specs/serve-batching.yaml``). ``factory bench list`` shows the stored runs.
"""

from __future__ import annotations

from aifactory.bench.spec import (
    LoadSpec, MLPModelSpec, ServingGrid, SLOTarget, SweepSpec, TrainingGrid, TrainRunSpec, TrialKind,
)
from aifactory.tenancy import TenantRef


def smoke(tenant: str = "demo") -> SweepSpec:
    """Two serving configurations (unbatched vs batched) x 3 repeats of a short load: ~40 s on 2 cores."""
    return SweepSpec(
        name="smoke",
        description="batching off vs on for a small MLP; the factory's end-to-end benchmark check",
        kind=TrialKind.SERVE_MLP,
        tenant=TenantRef(tenant=tenant),
        repeats=3,
        serving=ServingGrid(max_batch_size=[1, 16], batch_wait_timeout_s=[0.005], num_replicas=[1]),
        load=LoadSpec(num_requests=150, concurrency=16, warmup_requests=16),
        model=MLPModelSpec(input_dim=128, hidden_dim=256, num_layers=2, output_dim=8),
        slo=SLOTarget(p99_ms=500.0),
    )


def serve_batching(tenant: str = "demo") -> SweepSpec:
    """max_batch_size x batch_wait_timeout_s x replicas of the MLP deployment under a heavier load."""
    return SweepSpec(
        name="serve-batching",
        description="the serving knobs of the MLP deployment",
        kind=TrialKind.SERVE_MLP,
        tenant=TenantRef(tenant=tenant),
        repeats=3,
        serving=ServingGrid(max_batch_size=[1, 8, 32], batch_wait_timeout_s=[0.002, 0.01], num_replicas=[1, 2]),
        load=LoadSpec(num_requests=600, concurrency=32, warmup_requests=32),
        model=MLPModelSpec(input_dim=256, hidden_dim=1024, num_layers=3, output_dim=16),
        slo=SLOTarget(p99_ms=250.0),
    )


def train_knobs(tenant: str = "demo") -> SweepSpec:
    """workers x precision x sharding x batch size of a short training run to a validation-loss target."""
    return SweepSpec(
        name="train-knobs",
        description="time-to-quality of the training knobs",
        kind=TrialKind.TRAIN_MLP,
        tenant=TenantRef(tenant=tenant),
        repeats=3,
        training=TrainingGrid(num_workers=[1, 2], precision=["fp32", "bf16"], sharding=["ddp", "fsdp"],
                              batch_size=[64]),
        train=TrainRunSpec(target_val_loss=0.35, max_steps=300, max_seconds=90.0, eval_every_steps=10),
        model=MLPModelSpec(input_dim=64, hidden_dim=256, num_layers=2, output_dim=8),
        slo=SLOTarget(time_to_quality_s=60.0),
        trial_num_cpus=0.25,
    )


def train_smoke(tenant: str = "demo") -> SweepSpec:
    """One single-worker training configuration x 3 repeats: the cheapest time-to-quality check."""
    return SweepSpec(
        name="train-smoke",
        description="time-to-quality of one tiny configuration",
        kind=TrialKind.TRAIN_MLP,
        tenant=TenantRef(tenant=tenant),
        repeats=3,
        training=TrainingGrid(num_workers=[1], precision=["fp32"], sharding=["none"], batch_size=[64]),
        train=TrainRunSpec(target_val_loss=0.5, max_steps=200, max_seconds=60.0, eval_every_steps=10,
                           cpus_per_worker=1.0),
        model=MLPModelSpec(input_dim=32, hidden_dim=128, num_layers=2, output_dim=4),
        slo=SLOTarget(time_to_quality_s=60.0),
        trial_num_cpus=0.25,
    )


RECIPES = {
    "smoke": smoke,
    "serve-batching": serve_batching,
    "train-knobs": train_knobs,
    "train-smoke": train_smoke,
}
