"""The recipe registry: named training and optimization recipes and sweep specs, shipped or the user's.

Why it exists: the library used to reach the checkout's ``jobs/recipes.py`` by putting the checkout on
``sys.path`` and to read ``benchmarks/specs`` by path, so a wheel install (no checkout beside it) could not
run ``factory run``, ``factory train --recipe tiny`` or a shipped sweep spec (issue 21). The shipped recipes
are package code and data now (:mod:`aifactory.recipes.training`, :mod:`aifactory.recipes.optimization`,
``specs/*.yaml``), and a user adds theirs without path surgery:

- an import path given by the caller, ``module:function``: ``factory train --recipe mypkg.recipes:big``;
- the ``aifactory.recipes`` entry-point group of an installed distribution (the entry point's name is the
  recipe's name): ``[project.entry-points."aifactory.recipes"] big = "mypkg.recipes:big"``;
- sweep specs: a YAML file path, or the directories in ``$AIFACTORY_BENCH_SPECS`` (``:``-separated,
  searched before the shipped ones).

A recipe is a function of the tenant (``fn()`` or ``fn(tenant)``) returning a ``TrainJob``, a
``DistillSpec`` or a ``QuantizeSpec``; its return annotation says which, so each lookup lists only the
recipes of the kind it wants. Names may use ``-`` for ``_``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aifactory.exceptions import ConfigError

ENTRY_POINT_GROUP = "aifactory.recipes"
SPECS_ENV = "AIFACTORY_BENCH_SPECS"
T = TypeVar("T")


# ---- the registry ------------------------------------------------------------------------------------------

def _shipped() -> dict[str, Callable[..., Any]]:
    from aifactory.recipes import optimization, training

    found: dict[str, Callable[..., Any]] = {}
    for mod in (training, optimization):
        for name, fn in vars(mod).items():
            if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == mod.__name__:
                found[name] = fn
    return found


def registry() -> dict[str, Callable[..., Any] | importlib.metadata.EntryPoint]:
    """Every named recipe: the shipped ones, then the ``aifactory.recipes`` entry points (loaded on use)."""
    found: dict[str, Callable[..., Any] | importlib.metadata.EntryPoint] = dict(_shipped())
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        name = ep.name.replace("-", "_")
        if name in found:
            raise ConfigError(f"entry point group {ENTRY_POINT_GROUP}",
                              [f"{ep.name} = {ep.value!r}: the name is already a recipe; give the entry point another name"])
        found[name] = ep
    return found


def _kind(fn: Callable[..., Any]) -> type | None:
    try:
        ann = inspect.signature(fn, eval_str=True).return_annotation
    except Exception:  # an unresolvable annotation: kind unknown, checked when the recipe is called
        return None
    return ann if isinstance(ann, type) else None


def _load(name: str, entry: Callable[..., Any] | importlib.metadata.EntryPoint, field: str) -> Callable[..., Any]:
    if not isinstance(entry, importlib.metadata.EntryPoint):
        return entry
    try:
        fn = entry.load()
    except Exception as err:
        raise ConfigError(field, [f"{name!r}: entry point {entry.value!r} of {ENTRY_POINT_GROUP} does not load ({err})"]) from None
    if not callable(fn):
        raise ConfigError(field, [f"{name!r}: entry point {entry.value!r} is not a function"])
    return fn


def _from_import_path(ref: str, field: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ConfigError(field, [f"{ref!r}: an import path is 'module:function', e.g. mypkg.recipes:big"])
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(field, [f"{ref!r}: cannot import module {module!r} ({err})"]) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(field, [f"{ref!r}: module {module!r} has no function {attr!r}"])
    return fn


def names(kind: type | None = None) -> list[str]:
    """Registered recipe names, only those returning ``kind`` when given (plus any of unknown kind)."""
    out = []
    for name, entry in registry().items():
        try:
            k = _kind(_load(name, entry, "recipe"))
        except ConfigError:
            k = None  # a broken entry point is listed; using it reports why
        if kind is None or k is None or k is kind:
            out.append(name)
    return sorted(out)


def resolve(name: str, *, kind: type | None = None, field: str = "--recipe") -> Callable[..., Any]:
    """The recipe function ``name`` names: ``module:function``, or a registered name (``-`` for ``_``)."""
    if ":" in name:
        return _from_import_path(name, field)
    key = name.replace("-", "_")
    entry = registry().get(key)
    if entry is None:
        raise ConfigError(field, [f"{name!r} is not a recipe; recipes: {', '.join(names(kind)) or '(none)'}; "
                                  "or give an import path module:function"])
    return _load(key, entry, field)


def build(name: str, kind: type[T], *, tenant: str | None = None, field: str = "--recipe",
          accept: tuple[type, ...] = ()) -> T:
    """Call the recipe ``name`` for ``tenant`` and check it returned a ``kind`` (or one of ``accept``)."""
    value = _call(resolve(name, kind=kind, field=field), tenant)
    if not isinstance(value, (kind, *accept)):
        wanted = " or ".join(t.__name__ for t in (kind, *accept))
        raise ConfigError(field, [f"{name!r} returned {type(value).__name__}, not a {wanted}"])
    return value


def _call(fn: Callable[..., Any], tenant: str | None) -> Any:
    return fn(tenant) if tenant else fn()


# ---- training --------------------------------------------------------------------------------------------

def recipe_names() -> list[str]:
    """The training recipes (functions returning a ``TrainJob``)."""
    from aifactory.train.config import TrainJob

    return names(TrainJob)


def load_recipe(name: str, *, tenant: str | None = None):
    """The ``TrainJob`` of the training recipe ``name`` (a registered name or ``module:function``)."""
    from aifactory.train.config import TrainJob

    return build(name, TrainJob, tenant=tenant, field="--recipe")


def build_job(*, recipe: str | None, config: str | None, **overrides):
    """A ``TrainJob`` from exactly one of a recipe name or a config file, with the CLI's overrides."""
    from aifactory.config import load_config
    from aifactory.train.config import TrainJob
    from aifactory.train.jobspec import apply_overrides

    if bool(recipe) == bool(config):
        raise ConfigError("train job", ["give exactly one of --recipe NAME or --config FILE"])
    job = load_recipe(recipe, tenant=overrides.get("tenant")) if recipe else load_config(TrainJob, config)
    return apply_overrides(job, **overrides)


# ---- optimization ------------------------------------------------------------------------------------------

def quantize_spec(method: str, *, tenant: str | None = None, max_loss_delta: float | None = None):
    """The recipe ``quantize_<method>`` (a ``QuantizeSpec``), with an optional gate override."""
    from aifactory.optimize.config import QuantizeSpec

    key = f"quantize_{method.replace('-', '_')}"
    if key not in registry():
        methods = [n.removeprefix("quantize_").replace("_", "-") for n in names(QuantizeSpec) if n.startswith("quantize_")]
        raise ConfigError("--method", [f"{method!r} has no recipe; methods: {', '.join(methods)}"])
    spec = build(key, QuantizeSpec, tenant=tenant, field="--method")
    if max_loss_delta is not None:
        spec = spec.model_copy(update={"gate": spec.gate.model_copy(update={"max_loss_delta": max_loss_delta})})
    return QuantizeSpec.model_validate(spec.model_dump())


def student_spec(name: str, *, tenant: str | None = None, max_steps: int | None = None,
                 workers: int | None = None, max_loss_delta: float | None = None):
    """The ``DistillSpec`` of ``name``: a distillation recipe, or a training recipe whose ``TrainJob`` is the
    student (with the default temperature, alpha and gate); then the CLI's overrides."""
    from aifactory.optimize.config import DistillSpec
    from aifactory.train.config import TrainJob
    from aifactory.train.jobspec import apply_overrides

    try:
        fn = resolve(name, field="--student")
    except ConfigError:
        raise ConfigError("--student", [f"{name!r} is neither a distillation recipe ({', '.join(names(DistillSpec))}) "
                                        f"nor a training recipe ({', '.join(names(TrainJob))})"]) from None
    value = _call(fn, tenant)
    if isinstance(value, TrainJob):
        value = DistillSpec(student=value)
    if not isinstance(value, DistillSpec):
        raise ConfigError("--student", [f"{name!r} returned {type(value).__name__}, not a DistillSpec or TrainJob"])
    student = apply_overrides(value.student, max_steps=max_steps, workers=workers, tenant=tenant)
    gate = value.gate if max_loss_delta is None else value.gate.model_copy(update={"max_loss_delta": max_loss_delta})
    return DistillSpec.model_validate({**value.model_dump(), "student": student.model_dump(), "gate": gate.model_dump()})


# ---- sweep specs -------------------------------------------------------------------------------------------

def shipped_specs_dir() -> Path:
    """The sweep specs inside the package (``benchmarks/specs`` in the checkout links here)."""
    return Path(str(importlib.resources.files(__name__) / "specs"))


def spec_dirs() -> list[Path]:
    """Where named sweep specs are looked up, first wins: ``$AIFACTORY_BENCH_SPECS``, then the shipped ones."""
    dirs = [Path(p) for p in os.environ.get(SPECS_ENV, "").split(os.pathsep) if p]
    dirs.append(shipped_specs_dir())
    seen: set[Path] = set()
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def sweep_specs() -> dict[str, Path]:
    """Every named sweep spec (file stem -> path), earlier directories winning."""
    found: dict[str, Path] = {}
    for d in reversed(spec_dirs()):
        for f in sorted(d.glob("*.yaml")):
            found[f.stem] = f
    return dict(sorted(found.items()))
