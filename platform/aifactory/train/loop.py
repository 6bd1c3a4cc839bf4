"""The Ray Train worker loop: deterministic data, FSDP2/DDP steps, DCP checkpoints, validation, registration.

Reproducibility: every rank seeds the same initialisation, reads its files in the data plane's
deterministic mode (``read_deterministic``: files permuted by ``(seed, epoch)``, dealt by rank, rows in
order) and, on resume at step ``s``, skips exactly the ``s`` batches it consumed before. Every rank steps
the same number of times (each cycles through its own epochs), so collectives always pair up. A resumed
run therefore replays the uninterrupted run's batches, and its losses match; each rank's RNG state travels
with the checkpoint, so dropout draws the same masks too.

Preemption (:mod:`aifactory.train.yielding`): rank 0 stats the run's yield-request file after every step and
broadcasts what it saw, so every rank stops after the same step; they checkpoint there as at any checkpoint
(validation and registration only on the scheduled steps), report it with ``preempted`` set, and return.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from typing import Any

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.train.config import GateSpec, TrainJob


class WorkerPayload(StrictModel):
    """What the driver hands every worker (``train_loop_config``): the job plus the run's resolved context."""

    job: TrainJob = Field(description="The validated job, with its dataset version pinned.")
    run_id: str = Field(description="The run's id (also Ray Train's run name).")
    home_root: str = Field(description="Factory home root, for the dataset store, registry and run dir.")
    run_storage_dir: str | None = Field(description="Local dir of this run's checkpoints (None for URIs).")
    code_version: str = Field(description="Code version of the driver.")
    config_hash: str = Field(description="Hash of the job config.")
    parent_run: str | None = Field(default=None, description="The run this one re-executes, if any.")
    registration: dict[str, str | None] | None = Field(
        default=None, description="How rank 0 registers validated checkpoints: the control plane's url and the "
                                  "job's grant (aifactory.registry.service.Registration); null = in-process.")


def gate_passes(val_loss: float, *, gate: GateSpec, best_validated: float | None) -> bool:
    """The quality gate: below the threshold (if set) and better than the last validated one (if set)."""
    if not math.isfinite(val_loss):
        return False
    if gate.max_val_loss is not None and not val_loss < gate.max_val_loss:
        return False
    if gate.min_improvement is not None and best_validated is not None:
        return val_loss < best_validated - gate.min_improvement
    return True


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``; ``step`` counts from 1."""
    if step <= warmup_steps:
        return lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---- the parts every trainer of the factory shares (training; distillation is another loss over them) ----

def adamw(params, opt_cfg):
    """AdamW with decoupled weight decay on matrices only (norms and biases are not decayed)."""
    import torch

    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt_cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=opt_cfg.lr, betas=opt_cfg.betas,
    )


def deterministic_batches(version, job: TrainJob, *, rank: int, world: int, skip: int = 0):
    """``(tokens, wait_s)`` of this rank's training batches, epoch after epoch, in the data plane's
    deterministic order; the first ``skip`` (consumed before a resume) are dropped."""
    from aifactory.data.feed import iter_token_batches, read_deterministic

    epoch = 0
    while True:
        ds = read_deterministic(version, "train", rank=rank, world_size=world, seed=job.seed, epoch=epoch, checksum=False)
        n = 0
        for tokens, wait_s in iter_token_batches(ds, batch_size=job.data.batch_size,
                                                 prefetch_batches=job.data.prefetch_batches, drop_last=True):
            n += 1
            if skip > 0:
                skip -= 1
                continue
            yield tokens, wait_s
        if n == 0:
            raise RuntimeError(f"rank {rank}: epoch {epoch} of {version.version} has no full batch of {job.data.batch_size}")
        epoch += 1


def optimizer_step(optimizer, params, loss, *, step: int, job: TrainJob) -> float:
    """One update from ``loss``: the warmup + cosine learning rate of ``step``, backward, clip, step.
    Returns the learning rate used. The loss is the trainer's own (cross-entropy, distillation, ...)."""
    import torch

    opt_cfg = job.optimizer
    lr = lr_at(step, lr=opt_cfg.lr, warmup_steps=opt_cfg.warmup_steps, total_steps=job.steps,
               min_lr_ratio=opt_cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if opt_cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
    optimizer.step()
    return lr


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from aifactory.data.feed import WaitMeter, iter_token_batches, read_deterministic
    from aifactory.data.store import DatasetStore
    from aifactory.data.tokenizer import PAD
    from aifactory.home import FactoryHome
    from aifactory.train import checkpoint as ckpt
    from aifactory.train.metrics import RayTrainMetrics, TrainingPeakMemory, mfu, peak_flops
    from aifactory.models.build import build_sharded
    from aifactory.train.parallel import ComputeDtypeProbe, autocast_context, current_device, pin_cpu_malloc_threshold
    from aifactory.train.yielding import read_request, request_path

    payload = WorkerPayload.model_validate(config)  # validate again on this side of the boundary
    job = payload.job
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = current_device(ctx.get_local_rank())
    home = FactoryHome.from_env(payload.home_root)
    version = DatasetStore(home).get(job.data.dataset_version)
    data_seq_len = version.manifest.seq_len
    seq_len = min(job.model.gpt.seq_len, data_seq_len - 1)  # model input; targets are shifted by one

    torch.manual_seed(job.seed)  # same dropout streams on every rank; the weights come from init_weights(seed)
    # Before anything big is allocated: keeps freed per-step buffers from piling up in glibc's heap (why: there).
    malloc_pinned = pin_cpu_malloc_threshold() if dev.device.type == "cpu" else False
    memory = TrainingPeakMemory(dev.device.type)
    memory.baseline()  # before the model exists: "above baseline" is what the model and its training add
    # Built on the meta device and initialised shard by shard: no rank materialises the full fp32 model.
    model = build_sharded(job.model.gpt, sharding=job.sharding, precision=job.precision, device=dev.device, seed=job.seed)
    dtype_probe = ComputeDtypeProbe(model)  # what forward really computes in (reported per rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, job.optimizer)
    autocast = lambda: autocast_context(sharding=job.sharding, precision=job.precision, device=dev.device)  # noqa: E731

    # ---- resume ---------------------------------------------------------------------------------------
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "val_curve": [], "best_validated": None,
                             "registered": [], "restarts": [], "preemptions": []}
    resume = None
    if rank == 0:
        reported = ray.train.get_checkpoint()
        rep = None
        if reported is not None:
            rep = (ckpt.step_of(reported.path) or 0, reported.path)
        fallback = ckpt.newest_complete_checkpoint(payload.run_storage_dir) if payload.run_storage_dir else None
        resume = ckpt.choose_resume(rep, fallback)
    box = [resume]
    if world > 1:
        dist.broadcast_object_list(box, src=0)  # every rank resumes from the same checkpoint
    resume = box[0]
    if resume is not None and payload.run_storage_dir is None:
        resume = (resume[0], ray.train.get_checkpoint().to_directory())  # remote storage: each rank fetches it
    if resume is not None:
        state = ckpt.load_sharded(resume[1], model=model, optimizer=optimizer)
        state.setdefault("preemptions", [])
        # Resuming the checkpoint a yield wrote is the preemption's second half, not a retry after a fault.
        cause = "preemption" if state["preemptions"] and state["preemptions"][-1]["step"] == resume[0] else "failure"
        state["restarts"].append({"from_step": resume[0], "path": str(resume[1]), "at": time.time(), "cause": cause})

    # ---- data -----------------------------------------------------------------------------------------
    val_all = []
    for tokens, _ in iter_token_batches(read_deterministic(version, "validation", checksum=False),
                                        batch_size=job.data.batch_size, prefetch_batches=1, drop_last=True):
        val_all.append(tokens)
        if len(val_all) >= job.validation.max_batches * world:
            break
    if not val_all:
        raise RuntimeError(f"{version.version} has no full validation batch of {job.data.batch_size} rows")
    # Same number of batches on every rank (FSDP collectives pair up); with fewer batches than ranks, every
    # rank evaluates all of them and the sum is divided by the world size.
    per_rank = len(val_all) // world
    my_val = val_all[rank::world][:per_rank] if per_rank else val_all

    def loss_of(tokens, *, sum_: bool = False):
        x = tokens[:, :seq_len].to(dev.device)
        y = tokens[:, 1 : seq_len + 1].to(dev.device)
        with autocast():
            logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=PAD, reduction="sum" if sum_ else "mean"), int((y != PAD).sum())

    def evaluate() -> float:
        model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=dev.device)
        with torch.no_grad():
            for tokens in my_val:
                loss_sum, n = loss_of(tokens, sum_=True)
                acc += torch.tensor([loss_sum.item(), n], dtype=torch.float64, device=dev.device)
        if world > 1:
            dist.all_reduce(acc)
        model.train()
        return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")

    # ---- measurement ----------------------------------------------------------------------------------
    metrics = RayTrainMetrics(tenant=job.tenant.tenant, run_id=payload.run_id, rank=rank)
    meter = WaitMeter(warmup_steps=1)
    flops_per_token = job.model.gpt.train_flops_per_token(seq_len)
    peak = peak_flops(dev.name, job.precision, cpu_cores=job.scaling.cpus_per_worker)
    tokens_per_step = job.data.batch_size * seq_len
    save_times: list[float] = []
    train_losses: list[float] = []
    fault_marker = home.runs_dir / payload.run_id / f".fault-rank{job.faults.kill_rank}-step{job.faults.kill_at_step}"
    yield_path = request_path(home, payload.run_id)
    yield_flag = torch.zeros(1, dtype=torch.int32, device=dev.device)

    def yield_request():
        """Rank 0's pending yield request (one stat per step), and whether every rank stops after this step:
        rank 0 decides and broadcasts it (a one-int collective), so no rank waits in a collective another left."""
        request = read_request(home, payload.run_id) if rank == 0 and yield_path.exists() else None
        if world == 1:
            return request, request is not None
        yield_flag.fill_(int(request is not None))
        dist.broadcast(yield_flag, src=0)
        return request, bool(yield_flag.item())

    def rank_stats() -> dict[str, Any]:
        timed = meter.wait_s + meter.compute_s
        steady_steps = max(meter.steps - meter.warmup_steps, 0)
        tps = steady_steps * tokens_per_step / timed if timed > 0 else 0.0
        return {"rank": rank, "tokens_per_s": tps, "mfu": mfu(tokens_per_s=tps, flops_per_token=flops_per_token, peak=peak.flops),
                "peak_memory_bytes": memory.peak(), "peak_memory_above_baseline_bytes": memory.above_baseline(),
                "memory_baseline_bytes": memory.baseline_bytes, "setup_peak_memory_bytes": memory.setup_peak_bytes,
                "peak_memory_method": memory.method, "malloc_mmap_threshold_pinned": malloc_pinned,
                # What the meter reads this run's holding by (benchmark trials price it: cost.metered).
                "placement_group_id": ray.get_runtime_context().get_placement_group_id(),
                **dtype_probe.summary(), **meter.summary()}

    model.train()
    memory.start()  # setup is done: from here on the peak is the training steps' (checkpoint saves excluded)
    batches = deterministic_batches(version, job, rank=rank, world=world, skip=state["step"])
    for step in range(state["step"] + 1, job.steps + 1):
        if job.faults.kill_rank == rank and job.faults.kill_at_step == step and not fault_marker.exists():
            fault_marker.parent.mkdir(parents=True, exist_ok=True)
            fault_marker.touch()  # first attempt only: the resumed run must get past this step
            os.kill(os.getpid(), signal.SIGKILL)
        tokens, wait_s = next(batches)
        t0 = time.perf_counter()
        loss, _ = loss_of(tokens)
        optimizer_step(optimizer, params, loss, step=step, job=job)
        loss_value = loss.item()  # syncs, so compute time is real
        compute_s = time.perf_counter() - t0
        meter.record(wait_s=wait_s, compute_s=compute_s)
        metrics.step(tokens=tokens_per_step, wait_s=wait_s, compute_s=compute_s, loss=loss_value)
        train_losses.append(loss_value)
        state["tokens_seen"] += tokens_per_step * world
        state["step"] = step

        request, stop = yield_request() if step < job.steps else (None, False)  # the last step just finishes
        scheduled = step % job.checkpoint.every_steps == 0 or step == job.steps
        if not (scheduled or stop):
            continue
        if scheduled:
            # ---- checkpoint: validate, gate, register, save, report -----------------------------------
            val_loss = evaluate()
            validated = gate_passes(val_loss, gate=job.validation.gate, best_validated=state["best_validated"])
            entry = {"step": step, "val_loss": val_loss, "train_loss": sum(train_losses) / max(len(train_losses), 1),
                     "validated": validated, "model_version": None}
            train_losses.clear()
            if validated:
                state["best_validated"] = val_loss
                if job.validation.register_validated:
                    entry["model_version"] = _register(model, payload, version.version, step, val_loss, rank, ckpt)
                    if entry["model_version"]:
                        state["registered"].append({"step": step, "version": entry["model_version"], "val_loss": val_loss})
            state["val_curve"] = [e for e in state["val_curve"] if e["step"] < step] + [entry]
        # A yield between scheduled steps checkpoints the state only: the val curve and the registered versions
        # stay those of the scheduled steps, as in a run that was never preempted. Rank 0 writes the trainer state.
        preempted = None
        if stop:
            preempted = {"step": step, "reason": request.reason if request else "",
                         "request_id": request.request_id if request else None, "at": time.time()}
            state["preemptions"] = [p for p in state["preemptions"] if p["step"] < step] + [preempted]

        stats = rank_stats()
        t_save = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=f"aif-ckpt-{payload.run_id}-r{rank}-")
        ckpt.save_sharded(tmp, model=model, optimizer=optimizer, trainer_state=state)
        save_s = time.perf_counter() - t_save
        save_times.append(save_s)
        stats["checkpoint_save_s"] = save_s
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, stats)
        else:
            gathered = [stats]
        metrics.summary(tokens_per_s=stats["tokens_per_s"], mfu_value=stats["mfu"], peak_bytes=stats["peak_memory_bytes"])
        metrics.checkpoint(save_s=save_s, val_loss=val_loss)
        report = _run_metrics(state, gathered, device=dev.name, backend=dev.backend, peak_source=peak.source,
                              peak=peak.flops, seq_len=seq_len, flops_per_token=flops_per_token, world=world,
                              save_times=save_times)
        report["preempted"] = preempted  # rank 0's report is the one Ray keeps: the driver reads it there
        from ray.train import Checkpoint

        ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=ckpt.step_dir_name(step))
        if stop:
            return  # every rank stops after this same step (the broadcast above)
        memory.start()  # a new window: the save's state-dict copies are not training memory


def _register(model, payload: WorkerPayload, dataset_version: str, step: int, val_loss: float, rank: int, ckpt) -> str | None:
    """Consolidate the weights (a collective) and have rank 0 register them through the control plane
    (aifactory.registry.service), which stamps the tenant and signs; idempotent per (run, step)."""
    import torch

    from aifactory.home import FactoryHome
    from aifactory.registry.service import Registration

    full = ckpt.consolidated_model_state(model)
    if rank != 0:
        return None
    job = payload.job
    registrar = Registration(**(payload.registration or {})).registrar(FactoryHome.from_env(payload.home_root),
                                                                       tenant=job.tenant.tenant)
    with tempfile.TemporaryDirectory(prefix="aif-weights-") as tmp:
        path = os.path.join(tmp, "weights.pt")
        torch.save(full, path)
        mv = registrar.register(
            job.model.name, weights_path=path, model_config=job.model.gpt.model_dump(mode="json"),
            manifest={
                "dataset_version": dataset_version, "code_version": payload.code_version,
                "config_hash": payload.config_hash, "seed": job.seed, "metrics": {"val_loss": val_loss},
                "tenant": job.tenant.tenant, "project": job.tenant.project, "run_id": payload.run_id,
                "parent": None, "parent_run": payload.parent_run, "step": step, "precision": job.precision,
                "sharding": job.sharding, "tokenizer": "byte",
            },
        )
    return mv.version


def _run_metrics(state, gathered, *, device, backend, peak_source, peak, seq_len, flops_per_token, world, save_times):
    mfus = [g["mfu"] for g in gathered]
    known = [m for m in mfus if isinstance(m, float)]
    return {
        "step": state["step"],
        "tokens_seen": state["tokens_seen"],
        "val_loss": state["val_curve"][-1]["val_loss"] if state["val_curve"] else None,  # None: yielded before validating
        "val_curve": state["val_curve"],
        "registered": state["registered"],
        "restarts": state["restarts"],
        "preemptions": state["preemptions"],
        "tokens_per_s": sum(g["tokens_per_s"] for g in gathered),
        "data_wait_fraction": sum(g["data_wait_fraction"] for g in gathered) / world,
        "data_wait_s": sum(g["wait_s"] for g in gathered),
        "compute_s": sum(g["compute_s"] for g in gathered),
        "peak_memory_bytes_per_worker": [g["peak_memory_bytes"] for g in gathered],
        "peak_memory_above_baseline_bytes_per_worker": [g["peak_memory_above_baseline_bytes"] for g in gathered],
        "checkpoint_save_s": {"last": save_times[-1], "mean": sum(save_times) / len(save_times),
                              "max_across_ranks": max(g["checkpoint_save_s"] for g in gathered)},
        "mfu": (sum(known) / len(known)) if known and len(known) == len(mfus) else "unknown",
        "mfu_peak_flops_per_worker": peak if peak else "unknown",
        "mfu_peak_source": peak_source,
        "model_flops_per_token": flops_per_token,
        "train_seq_len": seq_len,
        "device": device,
        "backend": backend,
        "world_size": world,
        "per_worker": json.loads(json.dumps(gathered, default=str)),
    }
