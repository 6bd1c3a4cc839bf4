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
    assert {"smoke", "serve-batching", "train-knobs", "train-smoke"} <= {p.stem for p in SHIPPED}


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
