"""Real Ray Train runs on the shared cluster: FSDP2 + bf16 on 2 CPU workers, DCP checkpoints, validation,
registration, a worker SIGKILLed mid-run that resumes, and `factory rerun` reproducing the curve.

Two full fits in all (each costs 20-60 s here): run A is killed at step 10 and resumes; `factory rerun A`
re-executes it without the fault. Their final losses must agree within 1e-3.
"""

from __future__ import annotations

import json
import os
import sysconfig
import time

import pytest

from tests.integration.conftest import run_factory

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_AT = 12, 4, 10


@pytest.fixture(scope="module")
def dataset(ray_driver):
    from aifactory.data.ingest import IngestConfig, ingest, local_writer
    from aifactory.home import FactoryHome
    from aifactory.tenancy import TenantRef

    home = FactoryHome.from_env(ray_driver.home).ensure()
    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    res = ingest(home, IngestConfig(source=src, seq_len=65, target_shard_mb=0.02, validation_fraction=0.2),
                 tenant=TenantRef(tenant="itest"), writer=local_writer)
    return home, res.version


def _job(version: str):
    from aifactory.models.gpt import GPTConfig
    from aifactory.tenancy import TenantRef
    from aifactory.train.config import (
        CheckpointSpec, DataSpec, FaultSpec, GateSpec, ModelSpec, OptimizerSpec, ScalingSpec, TrainJob, ValidationSpec,
    )

    return TrainJob(
        tenant=TenantRef(tenant="itest"),
        data=DataSpec(dataset_version=version, batch_size=8, prefetch_batches=1),
        model=ModelSpec(name="itest-gpt", gpt=GPTConfig(seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)),
        precision="bf16-mixed", sharding="fsdp", scaling=ScalingSpec(num_workers=2),
        optimizer=OptimizerSpec(lr=3e-3, warmup_steps=2), steps=STEPS,
        checkpoint=CheckpointSpec(every_steps=EVERY, keep_last=2),
        validation=ValidationSpec(max_batches=2, gate=GateSpec(max_val_loss=6.0, min_improvement=0.0)),
        max_failures=1, seed=7, faults=FaultSpec(kill_rank=1, kill_at_step=KILL_AT),
    )


@pytest.fixture(scope="module")
def killed_run(dataset):
    from aifactory.train.runner import run_training

    home, version = dataset
    t0 = time.monotonic()
    out = run_training(_job(version), home=home)
    return home, out, time.monotonic() - t0


def test_killed_worker_resumes_from_last_checkpoint_and_finishes(killed_run):
    home, out, _ = killed_run
    m = out.metrics
    assert out.manifest["status"] == "succeeded" and m["step"] == STEPS
    restarts = m["restarts"]
    assert len(restarts) == 1, restarts
    # lost at most one checkpoint interval
    assert KILL_AT - EVERY <= restarts[0]["from_step"] < KILL_AT
    assert [e["step"] for e in m["val_curve"]] == [4, 8, 12]
    assert (home.runs_dir / out.run_id / f".fault-rank1-step{KILL_AT}").exists()


def test_checkpoints_are_sharded_dcp_and_pruned(killed_run):
    from pathlib import Path

    from aifactory.train.checkpoint import is_complete

    _, out, _ = killed_run
    ckpt = Path(out.manifest["checkpoint_path"])
    assert ckpt.name == f"step_{STEPS:05d}" and is_complete(ckpt)
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    kept = sorted(p.name for p in ckpt.parent.glob("step_*") if is_complete(p))
    assert kept[-2:] == ["step_00008", "step_00012"]


def test_validated_checkpoints_are_registered_with_consolidated_weights(killed_run):
    import torch

    from aifactory.models.gpt import load_gpt
    from aifactory.registry import ModelRegistry

    home, out, _ = killed_run
    reg = ModelRegistry(home)
    mv = reg.get("itest-gpt", out.model_version)
    reg.verify(mv)
    assert mv.manifest["run_id"] == out.run_id and mv.manifest["step"] == STEPS
    assert mv.manifest["dataset_version"] == out.manifest["dataset_version"] and mv.manifest["seed"] == 7
    assert mv.manifest["tenant"] == "itest" and mv.manifest["config_hash"] == out.manifest["config_hash"]
    assert abs(mv.manifest["metrics"]["val_loss"] - out.final_val_loss) < 1e-9
    model = load_gpt(mv.weights_path, mv.model_config)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 259)
    # each validated checkpoint registered once, even though steps 9-10 ran twice
    mine = [v for v in reg.list("itest-gpt") if v.manifest["run_id"] == out.run_id]
    assert sorted(v.manifest["step"] for v in mine) == [e["step"] for e in out.metrics["val_curve"] if e["validated"]]


def test_run_outcome_reaches_the_cost_ledger(killed_run):
    """Cost per validated checkpoint needs the run, its retries and its validated checkpoints in the ledger."""
    from aifactory.cost.ledger import Ledger

    home, out, _ = killed_run
    kinds = [e["kind"] for e in Ledger(home.ledger_path).events(tenant="itest")]
    registered = out.metrics.get("registered") or []
    assert kinds.count("run") >= 1 and "run_failed" not in kinds
    assert kinds.count("checkpoint_validated") >= len(registered) >= 1
    assert kinds.count("retry") >= len(out.metrics.get("restarts") or []) >= 1  # the killed worker restarted once


def test_run_manifest_has_measurements(killed_run):
    from aifactory.train.runs import read_manifest

    home, out, _ = killed_run
    m = read_manifest(home, out.run_id)["metrics"]
    assert m["tokens_per_s"] > 0 and 0 <= m["data_wait_fraction"] < 1
    assert len(m["peak_memory_bytes_per_worker"]) == 2 and min(m["peak_memory_bytes_per_worker"]) > 50 << 20
    assert m["checkpoint_save_s"]["last"] > 0
    assert isinstance(m["mfu"], float) and 0 < m["mfu"] < 1 or m["mfu"] == "unknown"
    assert m["backend"] == "gloo" and m["world_size"] == 2
    # what forward really computed in, on every rank (FSDP2's bf16 policy; the shards stay fp32)
    assert {(w["compute_param_dtype"], w["compute_output_dtype"], w["stored_param_dtype"]) for w in m["per_worker"]} \
        == {("bfloat16", "bfloat16", "float32")}


def test_factory_rerun_reproduces_the_uninterrupted_curve(killed_run, ray_driver):
    home, out, fit_s = killed_run
    t0 = time.monotonic()
    proc = run_factory("rerun", out.run_id, "--format", "json", home=ray_driver.home, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert res["reproduced"] is True and res["restarts"] == 0
    # the resumed run's final loss equals the uninterrupted run's within 1e-3
    assert abs(res["val_loss"] - out.final_val_loss) <= 1e-3
    assert res["max_abs_val_loss_diff"] <= 1e-3
    print(f"killed run {fit_s:.1f}s, rerun {time.monotonic() - t0:.1f}s, diff {res['max_abs_val_loss_diff']:.2e}")
    listed = json.loads(run_factory("models", "--format", "json", home=ray_driver.home).stdout)
    assert any(v["manifest"]["run_id"] == res["run_id"] for v in listed)
