"""Real Ray Train runs on the shared cluster: FSDP2 + bf16 on 2 CPU workers, DCP checkpoints, validation,
registration, a worker SIGKILLed mid-run that resumes, `factory rerun` reproducing the curve, and preemption.

Three launches of one job in all (each costs 20-60 s here, nearly all Ray Train start-up):

- run A is killed at step 10 and resumes; `factory rerun A` re-executes it without the fault (the
  uninterrupted run). Their final losses must agree within 1e-3;
- preemption (issue 16, point 4): the same job without the fault, asked to yield once past its first
  checkpoint, checkpoints at the step it has reached and stops (`factory train` exits 75); run again with the
  same run id (AIFACTORY_RUN_ID, as the queue's dispatcher re-dispatches it), it resumes from that checkpoint
  and ends with the uninterrupted run's validation loss (that of `factory rerun A`: the same job, seed and data).

The model has dropout, so both matches also need each rank's RNG state to travel with the checkpoint, not just
the weights, the optimizer and the data position.
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
        model=ModelSpec(name="itest-gpt", gpt=GPTConfig(seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.1)),
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


@pytest.fixture(scope="module")
def uninterrupted(killed_run, ray_driver):
    """`factory rerun A`: run A's job again without its fault (the uninterrupted run of the same seed)."""
    t0 = time.monotonic()
    proc = run_factory("rerun", killed_run[1].run_id, "--format", "json", home=ray_driver.home, timeout=900,
                       check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout), time.monotonic() - t0


def test_factory_rerun_reproduces_the_uninterrupted_curve(killed_run, uninterrupted, ray_driver):
    home, out, fit_s = killed_run
    res, rerun_s = uninterrupted
    assert res["reproduced"] is True and res["restarts"] == 0
    # the resumed run's final loss equals the uninterrupted run's within 1e-3
    assert abs(res["val_loss"] - out.final_val_loss) <= 1e-3
    assert res["max_abs_val_loss_diff"] <= 1e-3
    print(f"killed run {fit_s:.1f}s, rerun {rerun_s:.1f}s, diff {res['max_abs_val_loss_diff']:.2e}")
    listed = json.loads(run_factory("models", "--format", "json", home=ray_driver.home).stdout)
    assert any(v["manifest"]["run_id"] == res["run_id"] for v in listed)


# ---- preemption: the same job, asked to yield, then resumed under its run id ----------------------------------

@pytest.fixture(scope="module")
def preempted(dataset, uninterrupted, ray_driver, tmp_path_factory):
    """The job of run A without its fault, preempted and resumed through `factory train`."""
    from aifactory.train.checkpoint import is_complete, step_dir_name
    from aifactory.train.config import FaultSpec
    from aifactory.train.runs import new_run_id, read_manifest
    from aifactory.train.yielding import request_yield, yield_requested
    from aifactory.workloads import read_record

    home, version = dataset
    job = _job(version).model_copy(update={"faults": FaultSpec()})  # what `factory rerun` ran
    config = tmp_path_factory.mktemp("yield") / "job.json"
    config.write_text(json.dumps(job.model_dump(mode="json")))
    out: dict = {"home": home, "uninterrupted": read_manifest(home, uninterrupted[0]["run_id"])["metrics"]}

    # ---- attempt 1: asked to yield once its first checkpoint is on storage -----------------------------------
    run_id = new_run_id()
    first = os.path.join(home.checkpoints, run_id, step_dir_name(EVERY))
    env = {**os.environ, "AIFACTORY_HOME": ray_driver.home, "AIFACTORY_RUN_ID": run_id}
    t0 = time.monotonic()
    proc = subprocess.Popen([*FACTORY, "train", "--config", str(config), "--format", "json"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not is_complete(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
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


def test_a_run_asked_to_yield_checkpoints_stops_and_exits_75(preempted):
    a1 = preempted["attempt1"]
    assert a1["rc"] == 75, a1["stdout"] + a1["stderr"]
    said = json.loads(a1["stdout"])
    assert said["status"] == "preempted" and said["run_id"] == preempted["run_id"]
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


def test_the_same_run_id_resumes_from_the_yield_checkpoint_and_clears_the_request(preempted):
    a1, a2 = preempted["attempt1"], preempted["attempt2"]
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


def test_preempted_and_resumed_run_ends_with_the_uninterrupted_validation_loss(preempted):
    from aifactory.train.runs import compare_curves

    base = preempted["uninterrupted"]
    m = preempted["attempt2"]["manifest"]["metrics"]
    diff = abs(m["val_loss"] - base["val_loss"])
    cmp = compare_curves(base["val_curve"], m["val_curve"])
    print(f"uninterrupted val_loss {base['val_loss']:.6f}; preempted at step "
          f"{preempted['attempt1']['manifest']['preempted']['step']} ({preempted['preempted_s']:.1f}s) + resumed "
          f"({preempted['resumed_s']:.1f}s) val_loss {m['val_loss']:.6f}; diff {diff:.2e}, curve max diff "
          f"{cmp['max_abs_diff']:.2e}; yield request -> ranks stopped {preempted['request_to_stop_s']:.1f}s, "
          f"-> `factory train` exited (75) {preempted['request_to_exit_s']:.1f}s")
    assert diff <= 1e-3
    assert cmp["reproduced"], cmp


def test_validated_checkpoints_are_registered_once_across_the_preemption(preempted):
    from aifactory.registry import ModelRegistry

    m = preempted["attempt2"]["manifest"]["metrics"]
    mine = [v for v in ModelRegistry(preempted["home"]).list("itest-gpt") if v.manifest["run_id"] == preempted["run_id"]]
    assert sorted(v.manifest["step"] for v in mine) == [e["step"] for e in m["val_curve"] if e["validated"]]
