"""TrainJob validation, recipes and CLI overrides, the quality gate, the LR schedule, MFU maths."""

import pytest

from aifactory.config import parse_config
from aifactory.exceptions import ConfigError
from aifactory.train.config import GateSpec, TrainJob
from aifactory.recipes import build_job, load_recipe, recipe_names
from aifactory.train.jobspec import apply_overrides
from aifactory.train.loop import gate_passes, lr_at
from aifactory.train.metrics import Peak, mfu, peak_flops
from aifactory.train.parallel import backend_for, resolve_use_gpu


def test_minimal_job_has_factory_defaults():
    job = parse_config(TrainJob, {"tenant": {"tenant": "acme"}})
    assert (job.precision, job.sharding, job.data.dataset_version) == ("bf16-mixed", "fsdp", None)


def test_job_collects_every_problem_with_field_names():
    with pytest.raises(ConfigError) as err:
        parse_config(TrainJob, {"tenant": {"tenant": "Bad_Tenant"}, "precision": "fp16", "sharding": "zero3",
                                "scaling": {"num_workers": 0}, "bogus": 1}, source="job.yaml")
    text = str(err.value)
    for field in ("tenant.tenant", "precision", "sharding", "scaling.num_workers", "bogus"):
        assert field in text
    assert len(err.value.problems) == 5


def test_cross_field_checks_name_both_fields_and_values():
    with pytest.raises(ConfigError) as err:
        parse_config(TrainJob, {"tenant": {"tenant": "a"}, "steps": 10, "checkpoint": {"every_steps": 20},
                                "optimizer": {"warmup_steps": 10}, "faults": {"kill_rank": 3}})
    text = str(err.value)
    assert "checkpoint.every_steps (20) exceeds steps (10)" in text
    assert "optimizer.warmup_steps (10) must be below steps (10)" in text
    assert "kill_rank and faults.kill_at_step go together" in text


def test_recipes_build_valid_jobs_and_overrides_fit_short_runs():
    assert {"tiny", "pipeline", "bench_state_heavy"} <= set(recipe_names())
    job = load_recipe("tiny", tenant="acme")
    assert job.tenant.tenant == "acme" and job.sharding == "fsdp" and job.precision == "bf16-mixed"
    short = apply_overrides(job, max_steps=5, workers=1, dataset="ds-1", tenant="other")
    assert (short.steps, short.checkpoint.every_steps, short.optimizer.warmup_steps) == (5, 5, 4)
    assert (short.scaling.num_workers, short.data.dataset_version, short.tenant.tenant) == (1, "ds-1", "other")
    with pytest.raises(ConfigError, match="not a recipe"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="exactly one"):
        build_job(recipe="tiny", config="x.yaml")


def test_config_file_round_trips(tmp_path):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(load_recipe("tiny").model_dump(mode="json")))
    assert build_job(recipe=None, config=str(path), max_steps=7).steps == 7


def test_quality_gate():
    gate = GateSpec(max_val_loss=3.0, min_improvement=0.01)
    assert gate_passes(2.9, gate=gate, best_validated=None)
    assert not gate_passes(3.1, gate=gate, best_validated=None)
    assert not gate_passes(2.9, gate=gate, best_validated=2.905)  # not enough improvement
    assert gate_passes(2.8, gate=gate, best_validated=2.9)
    assert not gate_passes(float("nan"), gate=GateSpec(min_improvement=None), best_validated=None)


def test_lr_schedule_warms_up_then_decays_to_floor():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)


def test_mfu_maths_and_peak_table():
    h100 = peak_flops("NVIDIA H100 80GB HBM3 SXM", "bf16-mixed")
    assert h100.flops == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H200", "bf16-mixed").flops == pytest.approx(989.4e12)
    # 1e12 FLOP/s achieved on a 989.4 TFLOP/s device
    assert mfu(tokens_per_s=1e6, flops_per_token=1e6, peak=h100.flops) == pytest.approx(1e12 / 989.4e12)
    unknown = peak_flops("Some Future Accelerator", "bf16-mixed")
    assert unknown.flops is None and mfu(tokens_per_s=1.0, flops_per_token=1.0, peak=unknown.flops) == "unknown"
    assert mfu(tokens_per_s=1.0, flops_per_token=1.0, peak=Peak(0.0, "").flops) == "unknown"


def test_cpu_peak_is_nominal_and_says_so():
    peak = peak_flops("cpu", "fp32", cpu_cores=2)
    if peak.flops is not None:
        assert "cpu nominal" in peak.source and peak.flops > 1e9


def test_device_choice_at_run_time():
    assert resolve_use_gpu(None, cluster_gpus=0) is False
    assert resolve_use_gpu(None, cluster_gpus=8) is True
    assert resolve_use_gpu(False, cluster_gpus=8) is False
    assert (backend_for(True), backend_for(False)) == ("nccl", "gloo")


def test_configs_and_registry_import_without_torch_or_ray():
    import subprocess
    import sys

    code = ("import sys, aifactory.train.config, aifactory.recipes, aifactory.registry, aifactory.cli.train;"
            "aifactory.recipes.load_recipe('tiny'); aifactory.recipes.quantize_spec('bf16');"
            "aifactory.recipes.student_spec('tiny_student');"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
