"""Typed configs of optimization jobs: the quality gate, quantization and distillation.

The recipes that build them are in :mod:`aifactory.recipes` (``quantize_spec``, ``student_spec``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.tenancy import TenantRef
from aifactory.train.config import TrainJob

QuantMethod = Literal["auto", "int8-dynamic", "bf16", "fp8-weight"]


class VariantGate(StrictModel):
    """When a variant is servable: its validation loss may exceed its parent's by at most these margins.

    Both losses are measured in the same process on the same batches of the parent's dataset validation
    split, so the delta compares like with like.
    """

    max_loss_delta: float = Field(
        default=0.05, ge=0, description="Largest allowed increase of validation loss over the parent's (nats/token)."
    )
    max_relative_delta: float | None = Field(
        default=None, ge=0, description="Largest allowed increase relative to the parent's loss (0.02 = 2%); None: unchecked."
    )


class EvalSpec(StrictModel):
    """How much of the validation split the gate reads."""

    batch_size: int = Field(default=16, ge=1, le=4096, description="Sequences per evaluation batch.")
    max_batches: int = Field(default=8, ge=1, le=100_000, description="Validation batches read (the same for parent and variant).")


class QuantizeSpec(StrictModel):
    """A quantization job: which method, and the gate the variant must pass."""

    tenant: TenantRef = Field(description="Who the job belongs to (attribution, the variant's manifest).")
    method: QuantMethod = Field(
        default="auto", description="int8-dynamic (CPU), bf16, fp8-weight (GPUs with fp8), or auto: chosen at run time."
    )
    gate: VariantGate = Field(default_factory=VariantGate, description="The quality gate.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Validation batches the gate reads.")


class DistillSpec(StrictModel):
    """A distillation job: the student (a training job: shape, steps, scaling, precision) and the loss mix."""

    student: TrainJob = Field(description="The student's training job; its dataset defaults to the teacher's.")
    temperature: float = Field(default=2.0, gt=0, le=100, description="Softmax temperature T of the soft targets.")
    alpha: float = Field(
        default=0.5, ge=0, le=1,
        description="Weight of the soft-target loss (T^2 * KL(teacher || student)); 1 - alpha weighs the hard-target CE.",
    )
    gate: VariantGate = Field(
        default_factory=lambda: VariantGate(max_loss_delta=1.0),
        description="The quality gate: the student's validation loss against the teacher's.",
    )
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Validation batches the gate reads.")
