"""Preemption of a real Ray Train run (issue 16, point 4): asked to yield once past its first checkpoint, a
2-worker FSDP2 + bf16 run checkpoints at the step it has reached and stops (`factory train` exits 75); run
again with the same run id (AIFACTORY_RUN_ID, as the queue's dispatcher re-dispatches it), it resumes from
that checkpoint and ends with the validation loss of an uninterrupted run of the same seed.

Three fits in all (each ~20-40 s here). The model has dropout, so the match also needs each rank's RNG state
to travel with the checkpoint, not just the weights, the optimizer and the data position.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import FACTORY, run_factory

pytestmark = pytest.mark.slow

STEPS, EVERY = 24, 4


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
        CheckpointSpec, DataSpec, GateSpec, ModelSpec, OptimizerSpec, ScalingSpec, TrainJob, ValidationSpec,
    )

    return TrainJob(
        tenant=TenantRef(tenant="itest"),
        data=DataSpec(dataset_version=version, batch_size=8, prefetch_batches=1),
        model=ModelSpec(name="itest-yield-gpt",
                        gpt=GPTConfig(seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.1)),
        precision="bf16-mixed", sharding="fsdp", scaling=ScalingSpec(num_workers=2),
        optimizer=OptimizerSpec(lr=3e-3, warmup_steps=2), steps=STEPS,
        checkpoint=CheckpointSpec(every_steps=EVERY, keep_last=2),
        validation=ValidationSpec(max_batches=2, gate=GateSpec(max_val_loss=6.0, min_improvement=0.0)),
        max_failures=0, seed=11,
    )


@pytest.fixture(scope="module")
def runs(dataset, ray_driver, tmp_path_factory):
    """The uninterrupted run, and the same job preempted and resumed through `factory train`."""
    from aifactory.train.checkpoint import is_complete, step_dir_name
    from aifactory.train.runner import run_training
    from aifactory.train.runs import new_run_id, read_manifest
    from aifactory.train.yielding import request_yield, yield_requested
    from aifactory.workloads import read_record

    home, version = dataset
    job = _job(version)
    config = tmp_path_factory.mktemp("yield") / "job.json"
    config.write_text(json.dumps(job.model_dump(mode="json")))
    out: dict = {"home": home}

    t0 = time.monotonic()
    out["uninterrupted"] = run_training(job, home=home)
    out["uninterrupted_s"] = time.monotonic() - t0

    # ---- attempt 1: asked to yield once its first checkpoint is on storage -----------------------------------
    run_id = new_run_id()
    first = os.path.join(home.checkpoints, run_id, step_dir_name(EVERY))
    env = {**os.environ, "AIFACTORY_HOME": ray_driver.home, "AIFACTORY_RUN_ID": run_id}
    t0 = time.monotonic()
    proc = subprocess.Popen([*FACTORY, "train", "--config", str(config), "--format", "json"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not is_complete(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    requested_at, t_request = time.time(), time.monotonic()
    request_yield(home, run_id, reason="factory-lane itest needs the CPUs")
    stdout, stderr = proc.communicate(timeout=300)
    out["preempted_s"] = time.monotonic() - t0
    out["request_to_exit_s"] = time.monotonic() - t_request  # what a lane's grace_s must cover
    manifest = read_manifest(home, run_id)
    out["request_to_stop_s"] = (manifest.get("preempted") or {}).get("at", requested_at) - requested_at
    ckpt = Path(manifest.get("checkpoint_path") or "")
    out["attempt1"] = {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "manifest": manifest,
                       "record": read_record(home, run_id), "request_pending": yield_requested(home, run_id),
                       # read now: the resumed run's later checkpoints push it out (keep_last)
                       "checkpoint": (ckpt.name, is_complete(ckpt), len(list(ckpt.glob("*.distcp"))))}

    # ---- attempt 2: re-dispatched with the same run id ---------------------------------------------------------
    t0 = time.monotonic()
    resumed = run_factory("train", "--config", str(config), "--format", "json", home=ray_driver.home, env=env,
                          check=False, timeout=420)
    out["resumed_s"] = time.monotonic() - t0
    out["attempt2"] = {"rc": resumed.returncode, "stdout": resumed.stdout, "stderr": resumed.stderr,
                       "manifest": read_manifest(home, run_id), "record": read_record(home, run_id),
                       "request_pending": yield_requested(home, run_id)}
    out["run_id"] = run_id
    return out


def test_a_run_asked_to_yield_checkpoints_stops_and_exits_75(runs):
    a1 = runs["attempt1"]
    assert a1["rc"] == 75, a1["stdout"] + a1["stderr"]
    said = json.loads(a1["stdout"])
    assert said["status"] == "preempted" and said["run_id"] == runs["run_id"]
    step = said["step"]
    assert EVERY < step < STEPS  # stopped after the request, well before the end
    m = a1["manifest"]
    assert m["status"] == "preempted" and m["preempted"]["step"] == step
    assert m["preempted"]["reason"] == "factory-lane itest needs the CPUs"
    assert m["metrics"]["step"] == step and m["metrics"]["preempted"]["step"] == step
    # the yield checkpoint is a whole DCP checkpoint (both ranks' shards) at the step every rank stopped at
    assert a1["checkpoint"] == (f"step_{step:05d}", True, 2)
    # the val curve holds the scheduled checkpoints only
    assert [e["step"] for e in m["metrics"]["val_curve"]] == list(range(EVERY, step + 1, EVERY))
    record = a1["record"]
    assert record.status == "preempted" and record.error is None and record.refs["preempted_at_step"] == str(step)
    assert a1["request_pending"] is not None  # honoured, kept until the run resumes


def test_the_same_run_id_resumes_from_the_yield_checkpoint_and_clears_the_request(runs):
    a1, a2 = runs["attempt1"], runs["attempt2"]
    assert a2["rc"] == 0, a2["stdout"] + a2["stderr"]
    step = a1["manifest"]["preempted"]["step"]
    m = a2["manifest"]
    assert m["status"] == "succeeded" and m["metrics"]["step"] == STEPS and m["resumed_from_step"] == step
    restarts = m["metrics"]["restarts"]
    assert [(r["from_step"], r["cause"]) for r in restarts] == [(step, "preemption")]
    steps_lost = step - restarts[0]["from_step"]
    assert 0 <= steps_lost <= EVERY
    assert [p["step"] for p in m["preemptions"]] == [step]
    assert a2["record"].status == "succeeded"
    assert a2["request_pending"] is None
    assert [e["step"] for e in m["metrics"]["val_curve"]] == list(range(EVERY, STEPS + 1, EVERY))


def test_preempted_and_resumed_run_ends_with_the_uninterrupted_validation_loss(runs):
    from aifactory.train.runs import compare_curves

    base = runs["uninterrupted"]
    m = runs["attempt2"]["manifest"]["metrics"]
    diff = abs(m["val_loss"] - base.final_val_loss)
    cmp = compare_curves(base.metrics["val_curve"], m["val_curve"])
    print(f"uninterrupted val_loss {base.final_val_loss:.6f} ({runs['uninterrupted_s']:.1f}s); preempted at step "
          f"{runs['attempt1']['manifest']['preempted']['step']} ({runs['preempted_s']:.1f}s) + resumed "
          f"({runs['resumed_s']:.1f}s) val_loss {m['val_loss']:.6f}; diff {diff:.2e}, curve max diff "
          f"{cmp['max_abs_diff']:.2e}; yield request -> ranks stopped {runs['request_to_stop_s']:.1f}s, "
          f"-> `factory train` exited (75) {runs['request_to_exit_s']:.1f}s")
    assert diff <= 1e-3
    assert cmp["reproduced"], cmp


def test_validated_checkpoints_are_registered_once_across_the_preemption(runs):
    from aifactory.registry import ModelRegistry

    m = runs["attempt2"]["manifest"]["metrics"]
    mine = [v for v in ModelRegistry(runs["home"]).list("itest-yield-gpt") if v.manifest["run_id"] == runs["run_id"]]
    assert sorted(v.manifest["step"] for v in mine) == [e["step"] for e in m["val_curve"] if e["validated"]]
