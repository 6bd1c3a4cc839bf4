"""Typed sweep specs: a grid over real knobs, repeated, of one trial kind, for one tenant.

A spec is a :class:`SweepSpec` loaded from YAML with :func:`load_spec` (the shipped ones, named through
:mod:`aifactory.recipes`, are in ``aifactory/recipes/specs``). :meth:`SweepSpec.trials` expands it into
:class:`TrialConfig` s, one per (configuration, repeat), configurations in grid order and the repeats of
one configuration adjacent (a serving configuration is deployed once and measured ``repeats`` times).

Knobs are validated per configuration: every combination of the grid must be a valid configuration, and
all problems are reported at once.
"""

from __future__ import annotations

import enum
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from aifactory.config import StrictModel, config_hash, load_config, parse_config
from aifactory.exceptions import ConfigError
from aifactory.tenancy import Name, SLOClass, TenantRef


class TrialKind(str, enum.Enum):
    SERVE_MLP = "serve-mlp"
    """A self-contained Serve deployment (a torch MLP behind ``@serve.batch``) under an HTTP load."""
    TRAIN_MLP = "train-mlp"
    """A short Ray Train run of a small torch model to a validation-loss target (time-to-quality)."""
    SERVE_COMPLETIONS = "serve-completions"
    """The real completions app (aifactory.serve.apps.completions) on a registry model version, under
    POST /v1/completions load."""
    SERVE_EMBEDDINGS = "serve-embeddings"
    """The real MiniLM embeddings app (aifactory.serve.apps.embeddings) under POST /v1/embeddings load."""
    TRAIN_GPT = "train-gpt"
    """A short aifactory.train run of the real GPT on a data-plane dataset version, to a validation-loss target."""

    @property
    def family(self) -> str:
        return "serving" if self.value.startswith("serve") else "training"


# ---- knobs: one configuration ------------------------------------------------------------------------

class ServingKnobs(StrictModel):
    max_batch_size: int = Field(ge=1, le=1024, description="@serve.batch max_batch_size of the replica.")
    batch_wait_timeout_s: float = Field(ge=0, le=1.0, description="@serve.batch batch_wait_timeout_s.")
    num_replicas: int = Field(ge=1, le=32, description="Replicas of the deployment.")
    slo_class: SLOClass = Field(default=SLOClass.INTERACTIVE, description="SLO class the deployment serves.")


class TrainingKnobs(StrictModel):
    num_workers: int = Field(ge=1, le=64, description="Ray Train workers.")
    precision: Literal["fp32", "bf16"] = Field(description="Compute precision (bf16 autocast; fp32 masters).")
    sharding: Literal["none", "ddp", "fsdp"] = Field(description="How the model is spread over workers.")
    batch_size: int = Field(ge=1, le=65536, description="Per-worker batch size.")

    @model_validator(mode="after")
    def _sharding_needs_workers(self) -> TrainingKnobs:
        if self.sharding == "none" and self.num_workers > 1:
            raise ValueError(
                f"sharding='none' with num_workers={self.num_workers}: several workers must share the model "
                "through sharding='ddp' or 'fsdp' (or use num_workers=1)"
            )
        return self


# ---- grids: lists of knob values, crossed ----------------------------------------------------------

class ServingGrid(StrictModel):
    max_batch_size: list[int] = Field(min_length=1, description="Values of max_batch_size to try.")
    batch_wait_timeout_s: list[float] = Field(min_length=1, description="Values of batch_wait_timeout_s.")
    num_replicas: list[int] = Field(default=[1], min_length=1, description="Values of num_replicas.")
    slo_class: list[SLOClass] = Field(default=[SLOClass.INTERACTIVE], min_length=1, description="SLO classes.")


class TrainingGrid(StrictModel):
    num_workers: list[int] = Field(default=[1], min_length=1, description="Values of num_workers.")
    precision: list[Literal["fp32", "bf16"]] = Field(default=["fp32"], min_length=1, description="Precisions.")
    sharding: list[Literal["none", "ddp", "fsdp"]] = Field(default=["none"], min_length=1, description="Shardings.")
    batch_size: list[int] = Field(min_length=1, description="Per-worker batch sizes.")


# ---- fixed settings of a sweep -----------------------------------------------------------------------

class LoadSpec(StrictModel):
    """The bounded HTTP load a serving trial drives at 127.0.0.1."""

    num_requests: int = Field(default=300, ge=10, le=1_000_000, description="Measured requests per trial.")
    concurrency: int = Field(default=16, ge=1, le=1024, description="Requests in flight at once.")
    warmup_requests: int = Field(default=20, ge=0, description="Unmeasured requests sent first.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="Per-request client timeout.")


class MLPModelSpec(StrictModel):
    """The small torch MLP the self-contained trial kinds serve and train."""

    input_dim: int = Field(default=256, ge=1, le=65536, description="Input features.")
    hidden_dim: int = Field(default=512, ge=1, le=65536, description="Hidden width.")
    num_layers: int = Field(default=3, ge=1, le=64, description="Hidden layers.")
    output_dim: int = Field(default=16, ge=1, le=65536, description="Output features.")


class CompletionsTrialSpec(StrictModel):
    """What a ``serve-completions`` trial deploys and asks (the knobs come from the serving grid)."""

    model_name: Name = Field(default="tiny-gpt", description="Registered model name to serve.")
    model_version: str | None = Field(
        default=None, description="Registry version (e.g. 'v3'); null = the newest validated (servable) one.")
    prompts: list[str] = Field(
        default=["def main():", "import os\n", "class Config:", "for i in range(", "# sum two numbers\n",
                 "while True:", "return x + ", "if __name__ == "],
        min_length=1, description="Prompts the load cycles through (request i sends prompts[i % len]).")
    max_tokens: int = Field(default=16, ge=1, le=4096, description="max_tokens of every request.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature of every request.")
    caches: bool = Field(
        default=False,
        description="Keep the app's exact and prefix caches on; off (default) so every request reaches the model.")
    idle_num_cpus: float = Field(
        default=0.05, gt=0, description="CPUs of each deployment the load does not reach (the other SLO class and "
                                        "the canary: one idle replica each).")


class EmbeddingsTrialSpec(StrictModel):
    """What a ``serve-embeddings`` trial sends (the knobs come from the serving grid; the app has one SLO class)."""

    texts: list[str] = Field(
        default=["def add(a, b): return a + b", "how do I read a file in Python?", "a quick brown fox",
                 "import numpy as np", "the cluster ran out of memory", "SELECT * FROM users WHERE id = 1",
                 "embeddings map text to vectors", "retry the request after a short wait"],
        min_length=1, description="Texts the load cycles through.")
    inputs_per_request: int = Field(default=1, ge=1, le=256, description="Texts in one request's `input` list.")


class GPTTrialSpec(StrictModel):
    """What a ``train-gpt`` trial trains: a recipe's model and optimizer, on a data-plane dataset version."""

    recipe: str = Field(default="tiny", description="Training recipe (a name in aifactory.recipes or module:function) "
                                                     "giving the model shape and optimizer; the grid's knobs and `train` "
                                                     "override the rest.")
    dataset_version: str | None = Field(
        default=None, description="Dataset version from the data plane; null = the newest one when the sweep starts.")
    validation_batches: int = Field(default=4, ge=1, description="Validation batches per worker per evaluation.")
    register_validated: bool = Field(
        default=False, description="Register checkpoints that reach the target in the model registry "
                                   "(off: a benchmark should not add model versions).")


class TrainRunSpec(StrictModel):
    """How long a training trial runs and what 'quality' means."""

    target_val_loss: float = Field(gt=0, description="Validation loss that counts as 'reached quality'.")
    max_steps: int = Field(default=400, ge=1, description="Give up after this many steps.")
    max_seconds: float = Field(default=120.0, gt=0, description="Give up after this wall time.")
    eval_every_steps: int = Field(default=20, ge=1, description="Evaluate the validation loss this often.")
    learning_rate: float = Field(default=3e-3, gt=0, description="AdamW learning rate.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each Train worker reserves.")


class SLOTarget(StrictModel):
    """The service-level objective a report recommends a configuration for."""

    p99_ms: float | None = Field(default=None, gt=0, description="p99 latency must stay under this (ms).")
    time_to_quality_s: float | None = Field(default=None, gt=0, description="Training must reach quality within.")


class SweepSpec(StrictModel):
    """One benchmark sweep: every configuration of the grid, each run ``repeats`` times."""

    name: Name = Field(description="Spec name (a DNS label); also the prefix of run ids.")
    description: str = Field(default="", description="What the sweep is for.")
    kind: TrialKind = Field(description="What one trial runs.")
    tenant: TenantRef = Field(description="Who the sweep's work and spend belong to.")
    repeats: int = Field(default=3, ge=3, le=100, description="Runs of each configuration (>= 3: measure variance).")
    serving: ServingGrid | None = Field(default=None, description="Grid of serving knobs (serving kinds).")
    training: TrainingGrid | None = Field(default=None, description="Grid of training knobs (training kinds).")
    load: LoadSpec = Field(default_factory=LoadSpec, description="Load of a serving trial.")
    model: MLPModelSpec = Field(default_factory=MLPModelSpec, description="Model of the self-contained kinds.")
    completions: CompletionsTrialSpec = Field(
        default_factory=CompletionsTrialSpec, description="Model version and requests of serve-completions.")
    gpt: GPTTrialSpec = Field(default_factory=GPTTrialSpec, description="Recipe and dataset of train-gpt.")
    embeddings: EmbeddingsTrialSpec = Field(
        default_factory=EmbeddingsTrialSpec, description="Requests of serve-embeddings.")
    train: TrainRunSpec | None = Field(default=None, description="Length and target of a training trial.")
    slo: SLOTarget = Field(default_factory=SLOTarget, description="SLO the report recommends a configuration for.")
    replica_num_cpus: float = Field(default=0.5, gt=0, description="CPUs each Serve replica reserves.")
    trial_num_cpus: float = Field(default=0.5, gt=0, description="CPUs the trial process itself reserves.")
    max_concurrent_trials: int = Field(
        default=1, ge=1, description="Trials at once (1 keeps latency figures free of cross-trial contention).")
    seed: int = Field(default=0, ge=0, description="Base seed; repeat r of a configuration uses seed + r.")
    region: str | None = Field(default=None, description="Region label (default $AIFACTORY_REGION or 'local').")
    ci_method: Literal["t", "bootstrap"] = Field(default="t", description="How intervals are computed.")

    @model_validator(mode="after")
    def _grid_matches_kind(self) -> SweepSpec:
        problems = []
        family = self.kind.family
        if family == "serving":
            if self.serving is None:
                problems.append(f"serving: kind={self.kind.value!r} needs a serving grid")
            if self.training is not None:
                problems.append(f"training: kind={self.kind.value!r} is a serving kind; remove the training grid")
        else:
            if self.training is None:
                problems.append(f"training: kind={self.kind.value!r} needs a training grid")
            if self.train is None:
                problems.append(f"train: kind={self.kind.value!r} needs train.target_val_loss")
            if self.serving is not None:
                problems.append(f"serving: kind={self.kind.value!r} is a training kind; remove the serving grid")
        # A section of another kind is a mistake (a copied spec), not something to ignore silently.
        owners = {"model": (TrialKind.SERVE_MLP, TrialKind.TRAIN_MLP), "completions": (TrialKind.SERVE_COMPLETIONS,),
                  "gpt": (TrialKind.TRAIN_GPT,), "embeddings": (TrialKind.SERVE_EMBEDDINGS,)}
        for section, kinds in owners.items():
            # Compared with the default, not model_fields_set: the spec travels to trials as full JSON.
            if self.kind not in kinds and getattr(self, section) != type(self).model_fields[section].default_factory():
                problems.append(f"{section}: only used by kind {' / '.join(k.value for k in kinds)}, "
                                f"not {self.kind.value!r}; remove it")
        if (self.kind is TrialKind.SERVE_EMBEDDINGS and self.serving is not None
                and self.serving.slo_class != [SLOClass.INTERACTIVE]):
            problems.append(f"serving.slo_class: the embeddings app has one class; use [interactive], "
                            f"not {[c.value for c in self.serving.slo_class]}")
        if (self.kind is TrialKind.TRAIN_GPT and self.train is not None
                and self.train.max_seconds != TrainRunSpec.model_fields["max_seconds"].default):
            problems.append("train.max_seconds: train-gpt runs are bounded by train.max_steps (aifactory.train "
                            "has no wall-time limit); remove max_seconds")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def configurations(self) -> list[ServingKnobs | TrainingKnobs]:
        """Every combination of the grid, validated; raises one ConfigError naming each bad combination."""
        grid, knobs_cls = (self.serving, ServingKnobs) if self.kind.family == "serving" else (self.training, TrainingKnobs)
        assert grid is not None  # the validator guarantees it
        names = list(type(grid).model_fields)
        configs, problems, seen = [], [], set()
        for values in itertools.product(*(getattr(grid, n) for n in names)):
            data = dict(zip(names, values))
            try:
                knobs = parse_config(knobs_cls, data, source="configuration")
            except ConfigError as err:
                problems += [f"{self.kind.family} grid combination {data}: {p}" for p in err.problems]
                continue
            key = config_hash(knobs)
            if key not in seen:  # a value listed twice is one configuration
                seen.add(key)
                configs.append(knobs)
        if problems:
            raise ConfigError(f"sweep spec {self.name!r}", problems)
        return configs

    def trials(self) -> list[TrialConfig]:
        out = []
        for knobs in self.configurations():
            cid = config_id(knobs)
            for r in range(self.repeats):
                out.append(TrialConfig(config_id=cid, knobs=knobs.model_dump(mode="json"), repeat=r, seed=self.seed + r))
        return out

    def app_cpus(self, knobs: dict[str, Any]) -> float:
        """CPUs a serving trial's application reserves: the measured replicas, plus for the completions app its
        ingress and its two idle model deployments (what the service costs while it is measured)."""
        cpus = knobs["num_replicas"] * self.replica_num_cpus
        if self.kind is TrialKind.SERVE_COMPLETIONS:
            from aifactory.serve.config import INGRESS_NUM_CPUS

            cpus += INGRESS_NUM_CPUS + 2 * self.completions.idle_num_cpus
        return cpus

    def per_trial_cpus(self, knobs: dict[str, Any]) -> float:
        """CPUs one trial holds while it runs: its own process plus replicas or Train workers."""
        if self.kind.family == "serving":
            return self.trial_num_cpus + self.app_cpus(knobs)
        assert self.train is not None
        return self.trial_num_cpus + knobs["num_workers"] * self.train.cpus_per_worker


class TrialConfig(StrictModel):
    """One trial: a configuration of knobs and which repeat of it this is."""

    config_id: str = Field(description="Stable id of the knob values (same knobs, same id, across runs).")
    knobs: dict[str, Any] = Field(description="The knob values (ServingKnobs or TrainingKnobs as JSON).")
    repeat: int = Field(ge=0, description="Repeat index, 0-based.")
    seed: int = Field(ge=0, description="Seed of this repeat.")


def config_id(knobs: ServingKnobs | TrainingKnobs) -> str:
    """A short readable id: the knob values in order, e.g. ``b16-w0.005-r1-interactive``."""
    d = knobs.model_dump(mode="json")
    if isinstance(knobs, ServingKnobs):
        return f"b{d['max_batch_size']}-w{d['batch_wait_timeout_s']:g}-r{d['num_replicas']}-{d['slo_class']}"
    return f"n{d['num_workers']}-{d['precision']}-{d['sharding']}-bs{d['batch_size']}"


def load_spec(path: str | Path, *, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """A spec from a YAML file; every problem is reported at once."""
    spec = load_config(SweepSpec, path, overrides=overrides)
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    """Validate each combination now, not when the sweep reaches it (train-gpt: the whole TrainJob of each)."""
    spec.configurations()
    if spec.kind is TrialKind.TRAIN_GPT:
        from aifactory.bench.gpt_trial import check_jobs

        check_jobs(spec)


def spec_dirs() -> list[Path]:
    """Where named specs are looked up: ``$AIFACTORY_BENCH_SPECS`` (``:``-separated), then the shipped ones."""
    from aifactory.recipes import spec_dirs as dirs

    return dirs()


def available_specs() -> dict[str, Path]:
    """Every named spec (name -> file), from :mod:`aifactory.recipes`' registry of sweep specs."""
    from aifactory.recipes import sweep_specs

    return sweep_specs()


def find_spec(name_or_path: str, *, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """A spec by file path, or by name (``smoke`` -> the shipped ``aifactory/recipes/specs/smoke.yaml``)."""
    from aifactory.exceptions import NotFound

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        return load_spec(path, overrides=overrides)
    specs = available_specs()
    if name_or_path not in specs:
        raise NotFound("sweep spec", name_or_path,
                       f"known specs: {', '.join(specs) or '(none)'}; or pass a YAML file path")
    return load_spec(specs[name_or_path], overrides=overrides)
