"""The recipe registry: shipped recipes by name, a user's by import path or entry point, sweep specs by directory."""

from __future__ import annotations

import pytest

from aifactory.exceptions import ConfigError
from aifactory.recipes import (
    ENTRY_POINT_GROUP, SPECS_ENV, load_recipe, names, quantize_spec, recipe_names, student_spec, sweep_specs,
)

USER_MODULE = '''
from aifactory.optimize.config import QuantizeSpec
from aifactory.recipes.training import tiny
from aifactory.tenancy import TenantRef
from aifactory.train.config import TrainJob


def big(tenant: str = "demo") -> TrainJob:
    return tiny(tenant).model_copy(update={"steps": 80})


def quantize_int4ish(tenant: str = "demo") -> QuantizeSpec:
    return QuantizeSpec(tenant=TenantRef(tenant=tenant), method="bf16")
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """An installed distribution of the user's: a module and a dist-info with ``aifactory.recipes`` entry points."""
    (tmp_path / "myrecipes.py").write_text(USER_MODULE)
    info = tmp_path / "myrecipes-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myrecipes\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbig-run = myrecipes:big\n"
                                           "quantize_int4ish = myrecipes:quantize_int4ish\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_shipped_recipes_are_listed_by_what_they_return():
    assert {"tiny", "pipeline", "bench_state_heavy", "bench_parent"} <= set(recipe_names())
    assert "tiny_student" not in recipe_names() and "quantize_bf16" not in recipe_names()
    assert load_recipe("bench-state-heavy").model.name == "bench-gpt"  # '-' for '_'


def test_an_import_path_given_by_the_caller_is_a_recipe(user_package):
    assert load_recipe("myrecipes:big", tenant="acme").steps == 80
    with pytest.raises(ConfigError, match=r"--recipe: 'nomod:big': cannot import module 'nomod'"):
        load_recipe("nomod:big")
    with pytest.raises(ConfigError, match=r"module 'myrecipes' has no function 'small'"):
        load_recipe("myrecipes:small")


def test_entry_points_register_user_recipes_by_name(user_package):
    assert "big_run" in recipe_names()
    assert load_recipe("big-run", tenant="acme").tenant.tenant == "acme"
    assert quantize_spec("int4ish").method == "bf16"  # a new method's gate, named quantize_<method>
    assert student_spec("big-run", max_steps=3).student.steps == 3  # a TrainJob is a student too


def test_an_entry_point_may_not_shadow_a_shipped_recipe(user_package):
    (user_package / "myrecipes-0.1.dist-info" / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ntiny = myrecipes:big\n")
    with pytest.raises(ConfigError, match=r"tiny = 'myrecipes:big': the name is already a recipe"):
        names()


def test_wrong_kinds_and_unknown_names_say_which_field_and_what_exists():
    with pytest.raises(ConfigError, match=r"--recipe: 'quantize_bf16' returned QuantizeSpec, not a TrainJob"):
        load_recipe("quantize_bf16")
    with pytest.raises(ConfigError, match=r"'nope' is not a recipe; recipes: .*tiny"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match=r"--method: 'fp4' has no recipe; methods: .*int8-dynamic"):
        quantize_spec("fp4")
    with pytest.raises(ConfigError, match=r"--student: 'zzz' is neither a distillation recipe \(.*tiny_student"):
        student_spec("zzz")


def test_spec_directories_from_the_environment_come_before_the_shipped_ones(tmp_path, monkeypatch):
    shipped = sweep_specs()
    assert {"smoke", "train-gpt", "serve-batching"} <= set(shipped)
    (tmp_path / "smoke.yaml").write_text("name: smoke\n")
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    monkeypatch.setenv(SPECS_ENV, str(tmp_path))
    found = sweep_specs()
    assert found["smoke"] == tmp_path / "smoke.yaml" and found["mine"] == tmp_path / "mine.yaml"
    assert found["train-gpt"] == shipped["train-gpt"]
