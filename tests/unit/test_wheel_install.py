"""A non-editable install runs without the checkout: the wheel, installed into a fresh venv, finds its recipes.

Issue 21 point 1: the library used to reach ``jobs/recipes.py`` and ``benchmarks/specs`` through the source
checkout (``sys.path`` surgery, ``parents[3]``), so ``pip install .`` could not run ``factory train --recipe
tiny``, ``factory run`` or a shipped sweep. Here the wheel is built from a copy of the sources (so the shared
checkout gets no ``build/``), installed with ``--no-deps`` into a fresh venv whose dependencies (Ray, torch,
pydantic, ...) come from the project venv's site-packages through a ``.pth`` line (a plain path line: the
project's editable finder is not activated, so ``aifactory`` can only come from the wheel), and run from a
directory outside the checkout. ~15 s here.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED_SPECS = sorted(p.stem for p in (REPO / "platform" / "aifactory" / "recipes" / "specs").glob("*.yaml"))

LOOKUP = """
import json, sys
import aifactory
from aifactory.recipes import load_recipe, quantize_spec, recipe_names, student_spec, sweep_specs
from aifactory.bench.spec import available_specs, find_spec

tiny = load_recipe("tiny", tenant="acme")
specs = {name: find_spec(name).name for name in available_specs()}  # each loads and validates (train-gpt: its recipe)
print(json.dumps({
    "file": aifactory.__file__,
    "recipes": recipe_names(),
    "tiny": [tiny.model.name, tiny.tenant.tenant, tiny.steps],
    "quantize": quantize_spec("int8-dynamic").method,
    "student": student_spec("tiny_student").student.model.name,
    "specs": specs,
    "spec_files": sorted(str(p) for p in sweep_specs().values()),
    "torch_or_ray_loaded": sorted(m for m in ("torch", "ray") if m in sys.modules),
}))
"""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert out.returncode == 0, f"{cmd[:4]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "platform", src / "platform",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
         cwd=src)
    (wheel,) = (tmp / "dist").glob("aifactory-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)])
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    deps = site.getsitepackages()[0] if site.getsitepackages() else sysconfig.get_path("purelib")
    (purelib / "project-deps.pth").write_text(deps + "\n")
    return venv


def test_the_wheel_not_the_checkout_is_imported_and_factory_help_runs(fresh_venv, tmp_path):
    out = _run([str(fresh_venv / "bin" / "factory"), "--help"], cwd=tmp_path)
    for verb in ("run", "train", "bench", "optimize"):
        assert verb in out.stdout


def test_recipes_and_every_shipped_sweep_spec_load_from_the_wheel(fresh_venv, tmp_path):
    got = json.loads(_run([str(fresh_venv / "bin" / "python"), "-c", LOOKUP], cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(fresh_venv), got["file"]  # not /work/main/platform
    assert {"tiny", "pipeline", "bench_state_heavy"} <= set(got["recipes"])
    assert got["tiny"] == ["tiny-gpt", "acme", 120]
    assert (got["quantize"], got["student"]) == ("int8-dynamic", "tiny-gpt-student")
    assert SHIPPED_SPECS and sorted(got["specs"]) == SHIPPED_SPECS
    assert all(got["specs"][name] == name for name in SHIPPED_SPECS)
    assert all(Path(f).is_relative_to(fresh_venv) for f in got["spec_files"]), got["spec_files"]
    assert got["torch_or_ray_loaded"] == []  # a recipe lookup stays light
