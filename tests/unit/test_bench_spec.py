"""Sweep specs: validation with every problem named, expansion, and every shipped spec file."""

from pathlib import Path

import pytest

from aifactory.bench.runner import plan_concurrency
from aifactory.bench.spec import SweepSpec, available_specs, find_spec, load_spec
from aifactory.exceptions import ConfigError, NotFound
from aifactory.config import parse_config
from tests.conftest import REPO

SHIPPED = sorted((REPO / "benchmarks" / "specs").glob("*.yaml"))


def _serving(**kw):
    data = {"name": "s", "kind": "serve-mlp", "tenant": {"tenant": "t"},
            "serving": {"max_batch_size": [1, 8], "batch_wait_timeout_s": [0.0, 0.01]}}
    data.update(kw)
    return parse_config(SweepSpec, data, source="spec")


def test_shipped_specs_exist_and_include_smoke():
    assert {"smoke", "serve-batching", "train-knobs", "train-smoke", "serve-completions", "serve-embeddings",
            "train-gpt"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_spec_validates(path: Path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.repeats >= 3
    assert len(spec.trials()) == len(spec.configurations()) * spec.repeats


def test_smoke_is_small():
    spec = find_spec("smoke")
    assert len(spec.configurations()) <= 3 and spec.load.num_requests <= 300


def test_trials_keep_repeats_of_a_configuration_adjacent_with_distinct_seeds():
    spec = _serving()
    trials = spec.trials()
    assert len(trials) == 4 * 3
    ids = [t.config_id for t in trials]
    assert ids[:3] == [ids[0]] * 3 and len(set(ids)) == 4
    assert [t.seed for t in trials[:3]] == [0, 1, 2]
    assert ids[0] == "b1-w0-r1-interactive"


def test_repeats_below_three_are_refused():
    with pytest.raises(ConfigError, match="repeats"):
        _serving(repeats=2)


def test_kind_and_grid_must_match():
    with pytest.raises(ConfigError, match="needs a training grid"):
        parse_config(SweepSpec, {"name": "x", "kind": "train-mlp", "tenant": {"tenant": "t"},
                                 "train": {"target_val_loss": 0.1}}, source="spec")
    with pytest.raises(ConfigError, match="needs a serving grid"):
        parse_config(SweepSpec, {"name": "x", "kind": "serve-mlp", "tenant": {"tenant": "t"}}, source="spec")


def test_bad_combination_names_both_fields_and_all_problems_are_collected():
    spec = parse_config(SweepSpec, {
        "name": "x", "kind": "train-mlp", "tenant": {"tenant": "t"}, "train": {"target_val_loss": 0.1},
        "training": {"num_workers": [1, 2, 4], "sharding": ["none", "ddp"], "batch_size": [8]}}, source="spec")
    with pytest.raises(ConfigError) as err:
        spec.configurations()
    assert len(err.value.problems) == 2  # none x 2 workers, none x 4 workers
    assert all("sharding='none'" in p and "num_workers=" in p for p in err.value.problems)


def test_unknown_fields_and_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        _serving(repeat=3, load={"concurrency": 0})
    text = str(err.value)
    assert "repeat: unknown field" in text and "load.concurrency" in text


def test_bad_tenant_is_refused():
    with pytest.raises(ConfigError, match="tenant"):
        _serving(tenant={"tenant": "Bad Name"})


def test_find_spec_unknown_name_lists_the_known_ones():
    with pytest.raises(NotFound, match="smoke"):
        find_spec("no-such-spec")
    assert "smoke" in available_specs()


def test_yaml_overrides(tmp_path):
    spec = find_spec("smoke", overrides={"repeats": 5, "load.concurrency": 4})
    assert spec.repeats == 5 and spec.load.concurrency == 4


def test_concurrency_fits_the_cluster_and_refuses_a_trial_that_cannot():
    spec = _serving(max_concurrent_trials=4, serving={"max_batch_size": [1], "batch_wait_timeout_s": [0.0],
                                                      "num_replicas": [1, 3]})
    trials = spec.trials()
    # the largest trial holds 0.5 (trial) + 3 x 0.5 (replicas) = 2 CPUs
    assert plan_concurrency(spec, trials, cluster_cpus=6) == 3
    assert plan_concurrency(spec, trials, cluster_cpus=2) == 1
    with pytest.raises(ConfigError, match="needs 2 CPUs"):
        plan_concurrency(spec, trials, cluster_cpus=1.5)


def test_load_generator_targets_loopback_only():
    from aifactory.bench.loadgen import drive_load

    with pytest.raises(ValueError, match="127.0.0.1"):
        drive_load("http://10.0.0.5:8000/x", lambda i: {}, num_requests=1, concurrency=1)


def test_cli_overrides_parse_yaml_values_and_reject_bad_ones():
    from aifactory.cli.bench import _parse_overrides

    assert _parse_overrides(["repeats=5", "load.concurrency=8", "slo.p99_ms=1.5"]) == {
        "repeats": 5, "load.concurrency": 8, "slo.p99_ms": 1.5}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _parse_overrides(["repeats"])


# ---- the kinds on the factory's own components ---------------------------------------------------------

def _gpt(**kw):
    data = {"name": "g", "kind": "train-gpt", "tenant": {"tenant": "t"},
            "training": {"num_workers": [1, 2], "precision": ["fp32", "bf16"], "sharding": ["fsdp"], "batch_size": [8]},
            "train": {"target_val_loss": 4.0, "max_steps": 20, "eval_every_steps": 5}}
    data.update(kw)
    return parse_config(SweepSpec, data, source="spec")


def test_completions_kind_takes_serving_knobs_and_counts_the_whole_app_in_its_footprint():
    spec = parse_config(SweepSpec, {
        "name": "c", "kind": "serve-completions", "tenant": {"tenant": "t"},
        "serving": {"max_batch_size": [1, 8], "batch_wait_timeout_s": [0.01], "num_replicas": [2],
                    "slo_class": ["batch"]},
        "completions": {"model_name": "tiny-gpt", "model_version": "v2", "max_tokens": 8}}, source="spec")
    assert spec.kind.family == "serving"
    assert [t.config_id for t in spec.trials()][::3] == ["b1-w0.01-r2-batch", "b8-w0.01-r2-batch"]
    # trial 0.5 + 2 replicas x 0.5 + ingress 0.25 + 2 idle deployments x 0.05
    assert spec.per_trial_cpus(spec.trials()[0].knobs) == pytest.approx(1.85)


def test_completions_args_put_the_knobs_on_the_measured_slo_class_only():
    from aifactory.bench.completions_trial import completions_args
    from aifactory.bench.spec import ServingKnobs

    spec = parse_config(SweepSpec, {
        "name": "c", "kind": "serve-completions", "tenant": {"tenant": "t"}, "replica_num_cpus": 0.75,
        "serving": {"max_batch_size": [32], "batch_wait_timeout_s": [0.02]},
        "completions": {"max_tokens": 16}}, source="spec")
    knobs = ServingKnobs(max_batch_size=32, batch_wait_timeout_s=0.02, num_replicas=3, slo_class="batch")
    args = completions_args(spec, knobs, home_root="/h", seq_len=128)
    assert args.batch.batching.max_batch_size == 32 and args.batch.batching.batch_wait_timeout_s == 0.02
    assert args.batch.autoscaling.min_replicas == args.batch.autoscaling.max_replicas == 3
    assert not args.batch.autoscaling.slo_aware and args.batch.num_cpus == 0.75
    assert args.interactive.autoscaling.max_replicas == 1 and args.interactive.num_cpus == 0.05
    assert args.default_slo_class == "batch" and args.admission.default_rate_limit is None
    assert not args.cache.exact_enabled and not args.cache.prefix_enabled  # the model does the work
    assert args.limits.max_tokens == 16 and args.limits.max_prompt_tokens == 112
    knobs = ServingKnobs(max_batch_size=64, batch_wait_timeout_s=0.0, num_replicas=1)
    args = completions_args(spec, knobs, home_root="/h", seq_len=128)
    assert args.interactive.max_ongoing_requests >= 64  # a full batch fits on one replica


def test_gpt_kind_builds_a_real_train_job_from_the_recipe_and_knobs():
    from aifactory.bench.gpt_trial import build_job
    from aifactory.bench.spec import TrainingKnobs

    spec = _gpt()
    job = build_job(spec, TrainingKnobs(num_workers=2, precision="bf16", sharding="fsdp", batch_size=8), seed=4,
                    storage_path="/tmp/x")
    assert (job.scaling.num_workers, job.precision, job.sharding, job.data.batch_size) == (2, "bf16-mixed", "fsdp", 8)
    assert job.steps == 20 and job.checkpoint.every_steps == 5 and job.checkpoint.keep_last >= 4  # all kept
    assert job.validation.gate.max_val_loss == 4.0 and job.validation.gate.min_improvement is None
    assert not job.validation.register_validated and job.max_failures == 0 and job.seed == 4
    assert job.model.gpt.d_model == 128  # the tiny recipe's shape
    one = build_job(spec, TrainingKnobs(num_workers=1, precision="fp32", sharding="none", batch_size=8), seed=0)
    assert one.sharding == "ddp" and one.precision == "fp32"


def test_gpt_kind_refuses_an_unknown_recipe_and_a_wall_time_limit(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("name: g\nkind: train-gpt\ntenant: {tenant: t}\ntraining: {batch_size: [8]}\n"
                   "train: {target_val_loss: 4.0, max_steps: 10}\ngpt: {recipe: no-such-recipe}\n")
    with pytest.raises(ConfigError, match="no-such-recipe"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="train.max_seconds"):
        _gpt(train={"target_val_loss": 4.0, "max_seconds": 30})


def test_sections_of_another_kind_are_refused():
    with pytest.raises(ConfigError, match="completions: only used by kind serve-completions"):
        _gpt(completions={"max_tokens": 4})
    with pytest.raises(ConfigError, match="gpt: only used by kind train-gpt"):
        _serving(gpt={"recipe": "pipeline"})
    with pytest.raises(ConfigError, match="model: only used by kind"):
        _gpt(model={"input_dim": 4})


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_spec_survives_the_trip_to_a_trial(path: Path):
    """Trials get the spec as full JSON (every section present): that must validate as the YAML did."""
    spec = load_spec(path)
    assert SweepSpec.model_validate_json(spec.model_dump_json()) == spec


def test_cost_per_million_tokens_and_its_absence():
    from aifactory.bench.outcomes import price_outcomes
    from aifactory.cost.pricebook import load_price_book

    book = load_price_book()
    m = {"num_ok": 100, "replica_cpu_s": 10.0, "tokens": 1600}
    out = price_outcomes(m, family="serving", book=book, region="local", tenant="t")
    assert out["cost_per_1m_tokens_usd"] == pytest.approx(out["cost_usd"] / 1600 * 1e6)
    assert out["cost_per_1m_tokens_usd"] > 0
    mlp = price_outcomes({"num_ok": 100, "replica_cpu_s": 10.0}, family="serving", book=book, region="local", tenant="t")
    assert mlp["cost_per_1m_tokens_usd"] is None and "token" in mlp["unavailable"]["cost_per_1m_tokens_usd"]
    # what the trial could not measure stays in the record next to the pricing gaps
    gpt = price_outcomes({"samples": 10, "train_cpu_s": 5.0, "train_wall_s": 5.0, "time_to_quality_s": None,
                          "unavailable": {"time_to_quality_s": "checkpoint gone"}},
                         family="training", book=book, region="local", tenant="t")
    assert gpt["unavailable"]["time_to_quality_s"] == "checkpoint gone"
    assert gpt["cost_per_validated_checkpoint_usd"] is None


def test_embeddings_kind_has_one_slo_class_and_its_args_carry_the_knobs():
    from aifactory.bench.embeddings_trial import embeddings_args
    from aifactory.bench.spec import ServingKnobs

    data = {"name": "e", "kind": "serve-embeddings", "tenant": {"tenant": "t"}, "replica_num_cpus": 0.5,
            "serving": {"max_batch_size": [1, 64], "batch_wait_timeout_s": [0.01], "num_replicas": [2]},
            "embeddings": {"inputs_per_request": 200}}
    spec = parse_config(SweepSpec, data, source="spec")
    assert spec.per_trial_cpus(spec.trials()[0].knobs) == pytest.approx(1.5)  # trial 0.5 + 2 replicas x 0.5
    args = embeddings_args(spec, ServingKnobs(max_batch_size=64, batch_wait_timeout_s=0.01, num_replicas=2))
    assert (args.batching.max_batch_size, args.batching.batch_wait_timeout_s) == (64, 0.01)
    assert args.autoscaling.min_replicas == args.autoscaling.max_replicas == 2 and not args.autoscaling.slo_aware
    assert args.num_cpus == 0.5 and args.max_inputs >= 200 and args.admission.default_rate_limit is None
    with pytest.raises(ConfigError, match="serving.slo_class: the embeddings app has one class"):
        parse_config(SweepSpec, {**data, "serving": {**data["serving"], "slo_class": ["batch"]}}, source="spec")
