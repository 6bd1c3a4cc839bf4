"""Typed configs of optimization jobs: the quality gate, quantization and distillation."""

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


# ---- recipes (jobs/optimize_recipes.py) ------------------------------------------------------------------

RECIPES_MODULE = "jobs.optimize_recipes"


def _recipes():
    import importlib

    from aifactory.train.jobspec import _recipes_module

    _recipes_module()  # puts the checkout on sys.path when run from the console script
    return importlib.import_module(RECIPES_MODULE)


def quantize_spec(method: str, *, tenant: str | None = None, max_loss_delta: float | None = None) -> QuantizeSpec:
    """The recipe ``quantize_<method>`` of jobs/optimize_recipes.py, with optional overrides."""
    from aifactory.exceptions import ConfigError

    fn = getattr(_recipes(), f"quantize_{method.replace('-', '_')}", None)
    if fn is None:
        raise ConfigError("--method", [f"{method!r} has no recipe; methods: auto, int8-dynamic, bf16, fp8-weight"])
    spec = fn(tenant) if tenant else fn()
    if max_loss_delta is not None:
        spec = spec.model_copy(update={"gate": spec.gate.model_copy(update={"max_loss_delta": max_loss_delta})})
    return QuantizeSpec.model_validate(spec.model_dump())


def student_spec(name: str, *, tenant: str | None = None, max_steps: int | None = None,
                 workers: int | None = None, max_loss_delta: float | None = None) -> DistillSpec:
    """``name`` from jobs/optimize_recipes.py (a DistillSpec) or jobs/recipes.py (a TrainJob student)."""
    from aifactory.exceptions import ConfigError
    from aifactory.train.jobspec import apply_overrides, load_recipe, recipe_names

    fn = getattr(_recipes(), name.replace("-", "_"), None)
    if callable(fn):
        spec = fn(tenant) if tenant else fn()
        if not isinstance(spec, DistillSpec):
            raise ConfigError("--student", [f"{name!r} returned {type(spec).__name__}, not a DistillSpec"])
    else:
        try:
            spec = DistillSpec(student=load_recipe(name, tenant=tenant))
        except ConfigError:
            raise ConfigError("--student", [f"{name!r} is neither a distillation recipe of {RECIPES_MODULE} nor a "
                                            f"training recipe ({', '.join(recipe_names())})"]) from None
    student = apply_overrides(spec.student, max_steps=max_steps, workers=workers, tenant=tenant)
    gate = spec.gate if max_loss_delta is None else spec.gate.model_copy(update={"max_loss_delta": max_loss_delta})
    return DistillSpec.model_validate({**spec.model_dump(), "student": student.model_dump(), "gate": gate.model_dump()})
