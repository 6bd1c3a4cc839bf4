"""Distillation: a Ray Train job that trains a smaller student on a teacher's soft targets plus the data.

The student is a :class:`~aifactory.train.config.TrainJob` (shape, steps, optimizer, scaling, precision,
sharding) run with the training machinery: FSDP2 per block with the bf16-mixed policy
(:func:`aifactory.models.build.build_sharded`: built on the meta device, sharded, then initialised), the
data plane's deterministic feed, the warmup + cosine schedule, and the consolidated full state dict at the
end. Each worker holds a frozen, full copy of the teacher (small next to the student's optimizer state) and
computes its logits on the same batch:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, tokens)

(Hinton et al. 2015: the T^2 factor keeps the soft-target gradients' scale independent of T.) PAD
positions count in neither term. Rank 0 reports the consolidated weights as the run's checkpoint; the
driver then measures the student against the teacher on the validation split (the same gate as
quantization) and registers it under the teacher's name, with lineage to the teacher and the dataset.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.exceptions import ConfigError
from aifactory.optimize.config import DistillSpec

WEIGHTS = "weights.pt"


class DistillPayload(StrictModel):
    """What the driver hands every worker (``train_loop_config``)."""

    spec: DistillSpec = Field(description="The validated distillation spec, dataset version pinned.")
    teacher_ref: str = Field(description="The teacher as name:version.")
    run_id: str = Field(description="The run's id (also Ray Train's run name).")
    home_root: str = Field(description="Factory home root (dataset store, registry).")


def distill_loss(student_logits, teacher_logits, targets, *, temperature: float, alpha: float, pad: int):
    """``(loss, soft, hard)`` of one batch; logits ``(B, T, V)``, targets ``(B, T)``; see the module docstring."""
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logits.float()
    mask = (targets != pad).float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="none").sum(-1)
    soft = (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2
    hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1), ignore_index=pad)
    return alpha * soft + (1 - alpha) * hard, soft, hard


def distill_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    from aifactory.data.store import DatasetStore
    from aifactory.data.tokenizer import PAD
    from aifactory.home import FactoryHome
    from aifactory.optimize.gate import load_registered
    from aifactory.registry import ModelRegistry
    from aifactory.train import checkpoint as ckpt
    from aifactory.train.loop import adamw, deterministic_batches, optimizer_step
    from aifactory.models.build import build_sharded
    from aifactory.train.parallel import autocast_context, current_device, pin_cpu_malloc_threshold

    payload = DistillPayload.model_validate(config)  # validate again on this side of the boundary
    spec, job = payload.spec, payload.spec.student
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = current_device(ctx.get_local_rank())
    home = FactoryHome.from_env(payload.home_root)
    version = DatasetStore(home).get(job.data.dataset_version)
    _, teacher = load_registered(ModelRegistry(home), payload.teacher_ref)
    teacher = teacher.to(dev.device).eval().requires_grad_(False)
    seq_len = min(job.model.gpt.seq_len, teacher.config.seq_len, version.manifest.seq_len - 1)

    if dev.device.type == "cpu":
        pin_cpu_malloc_threshold()  # FSDP2's per-block buffers otherwise grow the heap step after step
    torch.manual_seed(job.seed)
    # Meta-device build, sharded, then a seeded init: no rank holds the full fp32 student under FSDP2.
    student = build_sharded(job.model.gpt, sharding=job.sharding, precision=job.precision, device=dev.device,
                            seed=job.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = adamw(params, job.optimizer)

    student.train()
    feed = deterministic_batches(version, job, rank=rank, world=world)
    losses: list[dict[str, float]] = []
    wait_total = compute_total = 0.0
    t_start = time.perf_counter()
    for step in range(1, job.steps + 1):
        tokens, wait_s = next(feed)
        t0 = time.perf_counter()
        x, y = tokens[:, :seq_len].to(dev.device), tokens[:, 1 : seq_len + 1].to(dev.device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        with autocast_context(sharding=job.sharding, precision=job.precision, device=dev.device):
            logits = student(x)
        loss, soft, hard = distill_loss(logits, teacher_logits, y, temperature=spec.temperature, alpha=spec.alpha, pad=PAD)
        optimizer_step(optimizer, params, loss, step=step, job=job)
        losses.append({"step": step, "loss": loss.item(), "soft": soft.item(), "hard": hard.item()})
        wait_total += wait_s
        compute_total += time.perf_counter() - t0

    full = ckpt.consolidated_model_state(student)  # a collective: every rank takes part
    tokens_per_s = job.steps * job.data.batch_size * seq_len * world / max(time.perf_counter() - t_start, 1e-9)
    metrics = {"steps": job.steps, "first": losses[0], "last": losses[-1], "tokens_per_s": tokens_per_s,
               "data_wait_s": wait_total, "compute_s": compute_total, "train_seq_len": seq_len, "world_size": world,
               "device": dev.name, "loss_curve": losses[:: max(1, len(losses) // 20)]}
    if rank != 0:
        ray.train.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix=f"aif-distill-{payload.run_id}-")
    torch.save(full, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name="student")


def run_distillation(home, teacher: str, spec: DistillSpec, *, batches=None,
                     log: Callable[[str], None] = lambda msg: None):
    """Distill ``teacher`` (name[:version]) into ``spec.student`` on the connected cluster; gate; register.

    Returns ``(ModelVersion, GateResult, run manifest)``; a student failing the gate is registered not
    servable and VariantRejected is raised (the run manifest is written first).
    """
    import ray

    from aifactory.optimize.gate import parse_ref
    from aifactory.registry import ModelRegistry
    from aifactory.tenancy import WorkloadKind
    from aifactory.train import runs
    from aifactory.train.parallel import resolve_use_gpu
    from aifactory.train.runner import pin_dataset, train_workload
    from aifactory.workloads import launch

    home = home.ensure()
    registry = ModelRegistry(home)
    teacher_mv = registry.get(*parse_ref(teacher))
    job = spec.student
    problems = []
    if job.model.gpt.vocab_size != int(teacher_mv.model_config.get("vocab_size", -1)):
        problems.append(f"student.model.gpt.vocab_size ({job.model.gpt.vocab_size}) must equal the teacher's "
                        f"({teacher_mv.model_config.get('vocab_size')}): soft targets are over the teacher's vocabulary")
    if job.model.gpt.num_params() >= _num_params(teacher_mv.model_config):
        problems.append(f"student ({job.model.gpt.num_params():,} parameters) is not smaller than the teacher "
                        f"{teacher_mv.ref} ({_num_params(teacher_mv.model_config):,})")
    if problems:
        raise ConfigError(f"distillation of {teacher_mv.ref}", problems)
    if job.data.dataset_version is None:
        job = job.model_copy(update={"data": job.data.model_copy(
            update={"dataset_version": teacher_mv.manifest.get("dataset_version")})})
    job, version = pin_dataset(job, home)
    spec = spec.model_copy(update={"student": job})
    run_id = runs.new_run_id("distill")
    use_gpu = resolve_use_gpu(job.scaling.use_gpu, cluster_gpus=ray.cluster_resources().get("GPU", 0))
    workload = train_workload(job, use_gpu=use_gpu, kind=WorkloadKind.OPTIMIZE, name=f"distill {teacher_mv.ref}")
    return launch(workload, home=home, record_id=run_id,
                  run=lambda handle: _distill(home, registry, teacher_mv, spec, version, handle=handle,
                                              use_gpu=use_gpu, batches=batches, log=log))


def _distill(home, registry, teacher_mv, spec: DistillSpec, version, *, handle, use_gpu: bool, batches,
             log: Callable[[str], None]):
    """The launched distillation: the shared Ray Train launch over the distillation loop, then the gate."""
    import torch

    from aifactory.config import config_hash
    from aifactory.models.build import build_model
    from aifactory.models.quantized import load_state
    from aifactory.optimize.gate import load_registered, measure, register_variant, validation_batches, variant_manifest
    from aifactory.provenance import code_version
    from aifactory.train import runs
    from aifactory.exceptions import error_line
    from aifactory.train.runner import TrainingFailed, fit_trainer, storage_of

    job, run_id = spec.student, handle.id
    code = str(code_version())
    manifest: dict[str, Any] = {
        "run_id": run_id, "kind": "distill", "status": "running", "tenant": job.tenant.tenant,
        "project": job.tenant.project, "teacher": teacher_mv.ref, "spec": spec.model_dump(mode="json"),
        "dataset_version": version.version, "code_version": code, "config_hash": config_hash(spec),
        "seed": job.seed, "use_gpu": use_gpu, "started_at": runs.utc_now(),
    }
    runs.write_manifest(home, run_id, manifest)
    log(f"distill {run_id}: {teacher_mv.ref} -> student {job.model.gpt.num_params():,} params, {job.sharding}+"
        f"{job.precision} on {job.scaling.num_workers} {'GPU' if use_gpu else 'CPU'} workers, {job.steps} steps, "
        f"T={spec.temperature}, alpha={spec.alpha}, dataset {version.version}")
    payload = DistillPayload(spec=spec, teacher_ref=teacher_mv.qualified_ref, run_id=run_id, home_root=str(home.root))
    handle.ref("run_id", run_id)
    t0 = time.monotonic()
    result, error = fit_trainer(distill_loop_per_worker, payload.model_dump(mode="json"), run_id=run_id,
                                storage=storage_of(job, home), num_workers=job.scaling.num_workers,
                                cpus_per_worker=job.scaling.cpus_per_worker, use_gpu=use_gpu,
                                max_failures=job.max_failures, keep_last=None)
    manifest["wall_s"] = round(time.monotonic() - t0, 2)
    if error is not None or result is None or result.checkpoint is None:
        manifest["status"] = "failed"
        manifest["error"] = error_line(error, default="NoCheckpoint: no checkpoint reported")
        runs.write_manifest(home, run_id, manifest)
        raise TrainingFailed(run_id, manifest["error"])
    manifest["metrics"] = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, WEIGHTS), map_location="cpu", weights_only=True)
    student = load_state(build_model(job.model.gpt), state)
    _, teacher_model = load_registered(registry, teacher_mv.qualified_ref)
    if batches is None:
        batches = validation_batches(version, spec=spec.eval)
    gate = measure(teacher_model, student, batches, gate=spec.gate)
    log(f"distill {run_id}: val_loss teacher {gate.parent_val_loss:.4f}, student {gate.variant_val_loss:.4f} "
        f"(delta {gate.quality_delta:+.4f}): {'PASS' if gate.passed else 'FAIL'}")
    manifest["gate"] = gate.to_dict()
    variant = {"method": "distill", "teacher": teacher_mv.ref, "temperature": spec.temperature, "alpha": spec.alpha,
               "student_params": job.model.gpt.num_params(), "teacher_params": _num_params(teacher_mv.model_config),
               "steps": job.steps, "final_train_loss": (manifest["metrics"].get("last") or {}).get("loss")}
    mv_manifest = variant_manifest(
        teacher_mv, variant=variant, result=gate, tenant=job.tenant.tenant, code_version=code,
        config_hash=manifest["config_hash"], run_id=run_id, dataset_version=version.version, seed=job.seed,
        extra={"project": job.tenant.project, "precision": job.precision, "sharding": job.sharding},
    )
    try:
        from aifactory.registry.service import Registration

        registrar = Registration.from_env().registrar(home, tenant=job.tenant.tenant)
        mv = register_variant(registrar, teacher_mv.name, student, manifest=mv_manifest, result=gate)
    except Exception:
        manifest["status"] = "rejected"
        runs.write_manifest(home, run_id, manifest)
        raise
    manifest.update(status="succeeded", model_version=mv.version, finished_at=runs.utc_now())
    handle.event("checkpoint_validated", f"validated:{mv.version}")
    runs.write_manifest(home, run_id, manifest)
    return mv, gate, manifest


def _num_params(model_config: dict[str, Any]) -> int:
    from aifactory.models.gpt import GPTConfig

    return GPTConfig.model_validate(model_config).num_params()
