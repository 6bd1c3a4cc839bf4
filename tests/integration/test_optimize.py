"""Model optimization on the session cluster: quantize -> register -> serve -> answer, and a tiny distillation.

The gate reads the parent's validation split through the real data plane (Ray Data); the variant is served
by the real completions app as a canary beside its parent; the distillation is a real 1-worker Ray Train
run (FSDP2 + bf16-mixed) whose student is registered with lineage to the teacher and the dataset.
"""

from __future__ import annotations

import os
import sysconfig
import time

import httpx
import pytest


pytestmark = pytest.mark.slow

MODEL = "opt-lm"


@pytest.fixture(scope="module")
def teacher(ray_driver, tmp_path_factory):
    """A dataset version (stdlib json, tiny shards) and a registered float GPT naming it."""
    import torch

    from aifactory.data.ingest import IngestConfig, ingest, local_writer
    from aifactory.home import FactoryHome
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.registry import ModelRegistry
    from aifactory.tenancy import TenantRef

    home = FactoryHome.from_env(ray_driver.home).ensure()
    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    ds = ingest(home, IngestConfig(source=src, seq_len=65, target_shard_mb=0.02, validation_fraction=0.2),
                tenant=TenantRef(tenant="itest"), writer=local_writer).dataset
    cfg = GPTConfig(seq_len=128, d_model=64, n_layers=2, n_heads=4, d_ff=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "w.pt"
    torch.save(GPT(cfg).state_dict(), path)
    mv = ModelRegistry(home).register(MODEL, weights_path=str(path), model_config=cfg.model_dump(),
                                      manifest={"dataset_version": ds.version, "tenant": "itest", "seed": 0})
    return home, ds, mv


@pytest.fixture(scope="module")
def serve_port(serve_http_port):
    return serve_http_port


def test_quantize_register_serve_answer(teacher, serve_port):
    from ray import serve

    from aifactory.recipes import quantize_spec
    from aifactory.optimize.quantize import run_quantize
    from aifactory.registry import ModelRegistry
    from aifactory.serve.apps.completions import app_builder
    from aifactory.serve.config import AutoscalingSpec, CompletionsArgs, Limits, SLOClassConfig

    home, ds, parent = teacher
    t0 = time.monotonic()
    mv, gate = run_quantize(home, parent.ref, quantize_spec("int8-dynamic", tenant="itest"))
    print(f"quantize + gate on {ds.version}/validation: {time.monotonic() - t0:.1f}s, delta {gate.quality_delta:+.5f}")
    assert gate.passed and mv.servable and mv.manifest["parent"] == parent.ref
    assert mv.manifest["dataset_version"] == ds.version and mv.manifest["variant"]["method"] == "int8-dynamic"
    assert mv.manifest["variant"]["eval_split"] == f"{ds.version}/validation"
    assert ModelRegistry(home).get(MODEL, mv.version).size_bytes < parent.size_bytes / 2

    fixed = AutoscalingSpec(min_replicas=1, max_replicas=1, slo_aware=False)
    small = SLOClassConfig(num_cpus=0.25, autoscaling=fixed)
    args = CompletionsArgs(model_name=MODEL, model_version=parent.version, canary_version=mv.version,
                           canary_percent=0, home=str(home.root),
                           interactive=small, batch=small, canary=small, limits=Limits(max_prompt_tokens=64, max_tokens=16))
    t0 = time.monotonic()
    serve.run(app_builder(args), name="optimize", route_prefix="/optimize")
    print(f"completions app with the int8 canary up in {time.monotonic() - t0:.1f}s")
    url = f"http://127.0.0.1:{serve_port}/optimize/v1/completions"
    try:
        for version in (mv.version, parent.version):  # the variant pinned as the canary, then its parent
            r = httpx.post(url, json={"model": f"{MODEL}:{version}", "prompt": "import json\n", "max_tokens": 8,
                                      "temperature": 0}, headers={"X-Tenant": "itest"}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["system_fingerprint"] == f"{MODEL}:{version}"
            assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["text"], str)
        status = httpx.get(f"http://127.0.0.1:{serve_port}/optimize/v1/status", headers={"X-Tenant": "itest"},
                           timeout=30).json()
        assert status["deployments"]["Canary"]["version"] == mv.version
    finally:
        serve.delete("optimize")


def test_tiny_distillation_registers_a_gated_student_with_lineage(teacher):
    from aifactory.models.gpt import GPTConfig
    from aifactory.optimize.config import DistillSpec, EvalSpec, VariantGate
    from aifactory.optimize.distill import run_distillation
    from aifactory.registry import ModelRegistry
    from aifactory.tenancy import TenantRef
    from aifactory.train import runs
    from aifactory.train.config import CheckpointSpec, DataSpec, ModelSpec, OptimizerSpec, ScalingSpec, TrainJob

    home, ds, parent = teacher
    student = TrainJob(
        tenant=TenantRef(tenant="itest"), data=DataSpec(batch_size=8),
        model=ModelSpec(name="opt-student", gpt=GPTConfig(seq_len=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)),
        precision="bf16-mixed", sharding="fsdp", scaling=ScalingSpec(num_workers=1),
        optimizer=OptimizerSpec(lr=3e-3, warmup_steps=1), steps=6, checkpoint=CheckpointSpec(every_steps=6),
        max_failures=0,
    )
    spec = DistillSpec(student=student, temperature=2.0, alpha=0.5, gate=VariantGate(max_loss_delta=2.0),
                       eval=EvalSpec(batch_size=8, max_batches=2))
    t0 = time.monotonic()
    mv, gate, run = run_distillation(home, parent.ref, spec, log=print)
    print(f"distillation (1 worker, 6 steps) + gate + register: {time.monotonic() - t0:.1f}s")
    m = mv.manifest
    assert mv.servable and m["parent"] == parent.ref and m["dataset_version"] == ds.version
    assert m["variant"]["method"] == "distill" and m["variant"]["teacher"] == parent.ref
    assert m["variant"]["student_params"] < m["variant"]["teacher_params"]
    assert m["run_id"] == run["run_id"] and runs.read_manifest(home, run["run_id"])["status"] == "succeeded"
    curve = run["metrics"]
    assert curve["steps"] == 6 and curve["first"]["soft"] > 0 and curve["last"]["hard"] > 0
    assert mv.model_config["d_model"] == 32
    ModelRegistry(home).verify(mv)
