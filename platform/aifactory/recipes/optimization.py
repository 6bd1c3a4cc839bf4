"""The shipped optimization recipes: quantization specs per method and distillation students.

`factory optimize quantize REF --method M` uses ``quantize_<method>`` (``-`` -> ``_``) for the gate;
`factory optimize distill REF --student NAME` takes a recipe returning a
:class:`~aifactory.optimize.config.DistillSpec`, or a training recipe (its ``TrainJob`` is then the
student with the default temperature, alpha and gate). Both look NAME up in :mod:`aifactory.recipes`.
Each takes the tenant.
"""

from __future__ import annotations

from aifactory.models.config import GPTConfig
from aifactory.optimize.config import DistillSpec, EvalSpec, QuantizeSpec, VariantGate
from aifactory.tenancy import TenantRef
from aifactory.train.config import CheckpointSpec, DataSpec, ModelSpec, OptimizerSpec, ScalingSpec, TrainJob


def quantize_int8_dynamic(tenant: str = "demo") -> QuantizeSpec:
    """int8 dynamic quantization of every Linear (CPU): at most +0.05 nats/token over the parent."""
    return QuantizeSpec(tenant=TenantRef(tenant=tenant), method="int8-dynamic",
                        gate=VariantGate(max_loss_delta=0.05), eval=EvalSpec(batch_size=16, max_batches=8))


def quantize_bf16(tenant: str = "demo") -> QuantizeSpec:
    """bf16 weights and compute: rounding only, so a tight +0.02 allowance."""
    return QuantizeSpec(tenant=TenantRef(tenant=tenant), method="bf16",
                        gate=VariantGate(max_loss_delta=0.02), eval=EvalSpec(batch_size=16, max_batches=8))


def quantize_fp8_weight(tenant: str = "demo") -> QuantizeSpec:
    """fp8 (e4m3) weight-only storage on GPUs with fp8 support: +0.05 allowance."""
    return QuantizeSpec(tenant=TenantRef(tenant=tenant), method="fp8-weight",
                        gate=VariantGate(max_loss_delta=0.05), eval=EvalSpec(batch_size=16, max_batches=8))


def quantize_auto(tenant: str = "demo") -> QuantizeSpec:
    """The method chosen at run time (bf16 on a GPU, int8-dynamic on a CPU) with int8's allowance."""
    return quantize_int8_dynamic(tenant).model_copy(update={"method": "auto"})


def tiny_student(tenant: str = "demo") -> DistillSpec:
    """A 1-block, 64-wide student of the tiny GPT (~4x fewer parameters): FSDP2 + bf16-mixed on 2 CPU workers."""
    student = TrainJob(
        tenant=TenantRef(tenant=tenant),
        data=DataSpec(batch_size=16),
        model=ModelSpec(name="tiny-gpt-student", gpt=GPTConfig(seq_len=128, d_model=64, n_layers=1, n_heads=2, d_ff=256)),
        precision="bf16-mixed", sharding="fsdp",
        scaling=ScalingSpec(num_workers=2),
        optimizer=OptimizerSpec(lr=3e-3, warmup_steps=5),
        steps=60,
        checkpoint=CheckpointSpec(every_steps=60, keep_last=1),
        seed=0,
    )
    return DistillSpec(student=student, temperature=2.0, alpha=0.5, gate=VariantGate(max_loss_delta=1.0),
                       eval=EvalSpec(batch_size=16, max_batches=8))


def bench_student(tenant: str = "bench") -> DistillSpec:
    """The student of ``benchmarks/variants.py``'s parent (``bench_parent``): half the width, half the depth."""
    spec = tiny_student(tenant)
    student = spec.student.model_copy(update={
        "model": ModelSpec(name="bench-student", gpt=GPTConfig(seq_len=128, d_model=128, n_layers=2, n_heads=4, d_ff=512)),
        "steps": 40,
        "checkpoint": CheckpointSpec(every_steps=40, keep_last=1),
    })
    return spec.model_copy(update={"student": student, "gate": VariantGate(max_loss_delta=1.5)})


def bench_parent(tenant: str = "bench") -> TrainJob:
    """A Linear-heavy parent for ``benchmarks/variants.py``: 256 wide, 4 blocks (~3.3M parameters), a short run."""
    return TrainJob(
        tenant=TenantRef(tenant=tenant),
        data=DataSpec(batch_size=8),
        model=ModelSpec(name="bench-variants", gpt=GPTConfig(seq_len=128, d_model=256, n_layers=4, n_heads=8, d_ff=1024)),
        precision="bf16-mixed", sharding="fsdp",
        scaling=ScalingSpec(num_workers=2),
        optimizer=OptimizerSpec(lr=2e-3, warmup_steps=5),
        steps=40,
        checkpoint=CheckpointSpec(every_steps=40, keep_last=1),
        seed=0,
    )
