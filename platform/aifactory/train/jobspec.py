"""Building a :class:`TrainJob` from a recipe name or a config file plus a few command-line overrides."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from aifactory.config import load_config, parse_config
from aifactory.exceptions import ConfigError
from aifactory.train.config import TrainJob

RECIPES_MODULE = "jobs.recipes"


def _recipes_module():
    try:
        return importlib.import_module(RECIPES_MODULE)
    except ModuleNotFoundError:
        # The console script does not put the checkout on sys.path; the recipes live beside platform/.
        root = Path(__file__).resolve().parents[3]
        if (root / "jobs" / "recipes.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            return importlib.import_module(RECIPES_MODULE)
        raise


def recipe_names() -> list[str]:
    mod = _recipes_module()
    return sorted(n for n, f in vars(mod).items()
                  if callable(f) and not n.startswith("_") and getattr(f, "__module__", "") == mod.__name__)


def load_recipe(name: str, *, tenant: str | None = None) -> TrainJob:
    """``name`` is a function of jobs/recipes.py (``-`` for ``_``) or ``module:function``."""
    if ":" in name:
        module, func = name.split(":", 1)
        fn = getattr(importlib.import_module(module), func, None)
    else:
        fn = getattr(_recipes_module(), name.replace("-", "_"), None)
    if fn is None or not callable(fn):
        raise ConfigError("--recipe", [f"{name!r} is not a recipe; recipes: {', '.join(recipe_names())}"])
    job = fn(tenant) if tenant else fn()
    if not isinstance(job, TrainJob):
        raise ConfigError("--recipe", [f"{name!r} returned {type(job).__name__}, not a TrainJob"])
    return job


def apply_overrides(job: TrainJob, *, dataset: str | None = None, max_steps: int | None = None,
                    workers: int | None = None, tenant: str | None = None) -> TrainJob:
    """The job with CLI overrides; ``max_steps`` also shortens the checkpoint interval and warmup to fit."""
    data: dict[str, Any] = job.model_dump(mode="json")
    if dataset:
        data["data"]["dataset_version"] = dataset
    if max_steps is not None:
        data["steps"] = max_steps
        data["checkpoint"]["every_steps"] = max(1, min(data["checkpoint"]["every_steps"], max_steps))
        data["optimizer"]["warmup_steps"] = max(0, min(data["optimizer"]["warmup_steps"], max_steps - 1))
    if workers is not None:
        data["scaling"]["num_workers"] = workers
    if tenant:
        data["tenant"]["tenant"] = tenant
    return parse_config(TrainJob, data, source="train job (after --dataset/--max-steps/--workers/--tenant)")


def build_job(*, recipe: str | None, config: str | None, **overrides) -> TrainJob:
    if bool(recipe) == bool(config):
        raise ConfigError("train job", ["give exactly one of --recipe NAME or --config FILE"])
    job = load_recipe(recipe, tenant=overrides.get("tenant")) if recipe else load_config(TrainJob, config)
    return apply_overrides(job, **overrides)
