"""The ``train-mlp`` trial kind: a short Ray Train run to a validation-loss target (time-to-quality).

The task is fixed by the spec's seed (a random "teacher" MLP labels Gaussian inputs; its outputs are
normalised to unit variance, so a validation MSE of 0.3 means "70% of the variance explained"). Each repeat
changes the student's initialisation and the data order (``trial.seed``). Workers shard the model with the
trial's ``sharding`` / ``precision`` through :mod:`aifactory.train.parallel` and evaluate every
``eval_every_steps``; rank 0 decides when the target is reached and broadcasts the decision.

Time-to-quality is measured inside the workers, from the first training step to the evaluation that reached
the target (Train's start-up is reported separately as ``startup_s``). Following the notes on Train V2 under
Tune, the trial builds a ``TorchTrainer`` whose ``RunConfig(callbacks=[TuneReportCallback()])`` forwards the
workers' single final report to Tune (reports block ~2 s each, so workers report once).
"""

from __future__ import annotations

import time
from typing import Any

from aifactory.bench.spec import MLPModelSpec, SweepSpec, TrainingKnobs, TrainRunSpec, TrialConfig

VAL_SIZE = 1024


def _mlp(spec: MLPModelSpec):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dims = [spec.input_dim] + [spec.hidden_dim] * spec.num_layers
            # ``blocks``: the units FSDP2 shards one by one (aifactory.models.build.shard_model).
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(dims, dims[1:]))
            self.head = nn.Linear(dims[-1], spec.output_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    return MLP()


def _task(spec: MLPModelSpec, task_seed: int):
    """The teacher and the validation set: the same for every repeat and worker."""
    import torch

    g = torch.Generator().manual_seed(task_seed)
    torch.manual_seed(task_seed)
    teacher = _mlp(spec).eval()
    with torch.no_grad():
        val_x = torch.randn(VAL_SIZE, spec.input_dim, generator=g)
        raw = teacher(val_x)
        mean, std = raw.mean(0, keepdim=True), raw.std(0, keepdim=True).clamp_min(1e-6)
    return teacher, (mean, std), val_x, (raw - mean) / std


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from aifactory.models.build import shard_model
    from aifactory.train.parallel import autocast_context

    # Train's loop config arrives as a dict: validate it again at this boundary.
    model_spec = MLPModelSpec.model_validate(config["model"])
    knobs = TrainingKnobs.model_validate(config["knobs"])
    run = TrainRunSpec.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)  # one core per worker; the trial reserves train.cpus_per_worker each
    teacher, (mean, std), val_x, val_y = _task(model_spec, config["task_seed"])
    torch.manual_seed(config["seed"])
    precision = "bf16-mixed" if knobs.precision == "bf16" else "fp32"
    device = torch.device("cpu")
    model = _mlp(model_spec)
    sharding = knobs.sharding
    if sharding != "none":
        model = shard_model(model, sharding=sharding, precision=precision, device=device)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if (sharding == "none" and precision != "fp32") \
        else (lambda: autocast_context(sharding=sharding if sharding != "none" else "ddp", precision=precision, device=device))
    opt = torch.optim.AdamW(model.parameters(), lr=run.learning_rate)
    data_gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad(), autocast():
            loss = torch.nn.functional.mse_loss(model(val_x).float(), val_y).item()
        model.train()
        return loss

    t0 = time.perf_counter()
    ttq = None
    val_loss = float("nan")
    step = 0
    samples = 0
    while step < run.max_steps and time.perf_counter() - t0 < run.max_seconds:
        x = torch.randn(knobs.batch_size, model_spec.input_dim, generator=data_gen)
        with torch.no_grad():
            y = (teacher(x) - mean) / std
        with autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        samples += knobs.batch_size * world
        if step % run.eval_every_steps == 0:
            val_loss = evaluate()
            reached = torch.tensor([1 if val_loss <= run.target_val_loss else 0])
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(reached, src=0)  # one decision for every rank
            if reached.item():
                ttq = time.perf_counter() - t0
                break
    wall = time.perf_counter() - t0
    if ttq is None:
        val_loss = evaluate()
    metrics = {
        "time_to_quality_s": ttq, "final_val_loss": val_loss, "steps": step, "samples": samples,
        "samples_per_s": samples / wall if wall > 0 else None, "train_wall_s": wall, "reached_target": ttq is not None,
        # The workers' group: what the trial's cost is metered by (aifactory.cost.metered).
        "metered_placement_group": ray.get_runtime_context().get_placement_group_id(),
    }
    # Rank 0 reports with a checkpoint (the model at quality, when reached): Train V2's Result.metrics holds
    # only reports that carried one. Other ranks report metrics alone, as Train requires every rank to report.
    if rank == 0:
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            with open(f"{tmp}/metrics.json", "w") as f:
                json.dump(metrics, f)
            if sharding != "fsdp":  # FSDP2 parameters are sharded DTensors; the metrics are what we need here
                torch.save(getattr(model, "module", model).state_dict(), f"{tmp}/model.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_mlp_trial(spec: SweepSpec, trial: TrialConfig, env) -> dict[str, Any]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from aifactory.bench.context import EnergyMeter
    from aifactory.train.runner import fit_trainer

    assert spec.train is not None  # the spec validator guarantees it for training kinds
    knobs = TrainingKnobs.model_validate(trial.knobs)
    meter = EnergyMeter()
    meter.start()
    t0, since = time.perf_counter(), time.time()
    config = {"model": spec.model.model_dump(), "knobs": knobs.model_dump(), "train": spec.train.model_dump(),
              "seed": trial.seed, "task_seed": spec.seed + 10_000}
    result, error = fit_trainer(train_worker, config, run_id=f"{env.run_id}-{trial.config_id}-r{trial.repeat}",
                                storage=env.storage_path, num_workers=knobs.num_workers,
                                cpus_per_worker=spec.train.cpus_per_worker, use_gpu=False, max_failures=0,
                                keep_last=None, callbacks=[TuneReportCallback()])
    if error is not None:
        raise error
    fit_s = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    energy_j = meter.stop_joules()
    wall = metrics.get("train_wall_s") or 0.0
    metrics.update(
        startup_s=max(fit_s - wall, 0.0),
        train_cpu_s=knobs.num_workers * spec.train.cpus_per_worker * wall,  # declared; metered ones replace it
        metered_since=since, metered_until=time.time(),
        energy_j=energy_j,
        energy_note=meter.note if energy_j is None else "",
    )
    return metrics
