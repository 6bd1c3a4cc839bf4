"""The ``train-gpt`` trial kind: a short :mod:`aifactory.train` run of the real GPT, to a validation-loss target.

A trial is one :func:`aifactory.train.runner.run_training` call (the factory's own trainer: Ray Train,
the data plane's feed, FSDP2/DDP, DCP checkpoints), so this module builds a :class:`TrainJob` and reads
its outcome; it has no training loop of its own. The job comes from a recipe (model shape, optimizer)
with the trial's knobs (workers, precision, sharding, per-worker batch size) and the spec's ``train``
(steps, evaluation cadence, target) applied on top. The quality gate is the target: a checkpoint is
*validated* when its validation loss is below ``train.target_val_loss``.

Time-to-quality is the wall time from submitting the run to the first validated checkpoint being
durable in storage (the newest modification time of its files), so it includes Train's start-up and
the data pipeline's first batch, as a user waiting for a usable checkpoint sees it. The run keeps every
checkpoint (``keep_last`` covers them all) so that the one at quality is still there to be timed.
"""

from __future__ import annotations

import math
import time
from typing import Any

from aifactory.bench.spec import SweepSpec, TrainingKnobs, TrialConfig, config_id

_PRECISION = {"fp32": "fp32", "bf16": "bf16-mixed"}


def build_job(spec: SweepSpec, knobs: TrainingKnobs, *, seed: int, storage_path: str | None = None):
    """The :class:`TrainJob` of one configuration: the recipe with the knobs and the spec's run settings."""
    from aifactory.config import parse_config
    from aifactory.train.config import TrainJob
    from aifactory.recipes import load_recipe
    from aifactory.train.jobspec import apply_overrides

    assert spec.train is not None  # the spec validator guarantees it for training kinds
    run = spec.train
    # The CLI's overrides (`factory train --dataset --max-steps --workers`): steps, and warmup fitted to them.
    job = apply_overrides(load_recipe(spec.gpt.recipe, tenant=spec.tenant.tenant), max_steps=run.max_steps,
                          workers=knobs.num_workers)
    data = job.model_dump(mode="json")
    every = min(run.eval_every_steps, run.max_steps)
    data["tenant"] = spec.tenant.model_dump(mode="json")
    data["data"].update(dataset_version=spec.gpt.dataset_version, batch_size=knobs.batch_size)
    data["precision"] = _PRECISION[knobs.precision]
    # One worker needs no sharding; aifactory.train wraps it in DDP, which is then a plain model.
    data["sharding"] = "ddp" if knobs.sharding == "none" else knobs.sharding
    data["scaling"]["cpus_per_worker"] = run.cpus_per_worker
    if run.learning_rate != type(run).model_fields["learning_rate"].default:  # otherwise the recipe's
        data["optimizer"]["lr"] = run.learning_rate
    data["checkpoint"] = {"every_steps": every, "keep_last": math.ceil(run.max_steps / every) + 1,
                          "storage_path": storage_path}
    data["validation"] = {"max_batches": spec.gpt.validation_batches,
                          "gate": {"max_val_loss": run.target_val_loss, "min_improvement": None},
                          "register_validated": spec.gpt.register_validated}
    data["max_failures"] = 0  # a restarted run would time its restart, not the configuration
    data["seed"] = seed
    data["faults"] = {}
    return parse_config(TrainJob, data, source=f"train-gpt configuration {config_id(knobs)}")


def check_jobs(spec: SweepSpec) -> None:
    """Build every configuration's job now (the recipe exists, the knobs fit it); one error naming each problem."""
    from aifactory.exceptions import ConfigError

    problems: list[str] = []
    for knobs in spec.configurations():
        try:
            build_job(spec, knobs, seed=spec.seed)
        except ConfigError as err:
            problems += [f"{config_id(knobs)}: {p}" for p in err.problems]
    if problems:
        raise ConfigError(f"sweep spec {spec.name!r}", problems)


def pin_dataset(spec: SweepSpec, home) -> SweepSpec:
    """The spec with its dataset version resolved (newest when unset) and checked against the largest configuration,
    so every trial trains on the same version and a misfit stops the sweep before any trial starts."""
    from aifactory.train.runner import pin_dataset as pin_job

    widest = max(spec.configurations(), key=lambda k: k.num_workers)
    # No re-hash here: every trial's run_training verifies the shards' checksums before it trains.
    _, version = pin_job(build_job(spec, widest, seed=spec.seed), home, checksum=False)
    return spec.model_copy(update={"gpt": spec.gpt.model_copy(update={"dataset_version": version.version})})


def _durable_at(location: str) -> float | None:
    """When the checkpoint directory's last file was written (epoch seconds), or None if it is gone."""
    import pyarrow.fs as pafs

    from aifactory.home import filesystem

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
    return max(times) if times else None


def train_gpt_trial(spec: SweepSpec, trial: TrialConfig, env) -> dict[str, Any]:
    from aifactory.bench.context import EnergyMeter
    from aifactory.home import FactoryHome
    from aifactory.train.checkpoint import step_dir_name
    from aifactory.train.runner import run_training

    assert spec.train is not None
    knobs = TrainingKnobs.model_validate(trial.knobs)
    home = FactoryHome.from_env(env.home_root)
    job = build_job(spec, knobs, seed=trial.seed, storage_path=env.storage_path)
    run_id = f"{env.run_id}-{trial.config_id}-r{trial.repeat}"
    meter = EnergyMeter()
    meter.start()
    t0 = time.time()
    # Its workers are part of what the sweep declared and was admitted for: recorded, not admitted again.
    outcome = run_training(job, home=home, run_id=run_id, within=env.run_id)
    wall = time.time() - t0
    energy_j = meter.stop_joules()
    m = outcome.metrics
    curve = m.get("val_curve") or []
    first = next((e for e in curve if e.get("validated")), None)
    ttq = None
    unavailable: dict[str, str] = {}
    if first is not None:
        storage = outcome.manifest["storage_path"].rstrip("/")
        done_at = _durable_at(f"{storage}/{run_id}/{step_dir_name(first['step'])}")
        if done_at is None:
            unavailable["time_to_quality_s"] = "the checkpoint at quality was not found in storage"
        else:
            ttq = max(done_at - t0, 0.0)
    steps = int(m.get("step") or 0)
    seq_len = int(m.get("train_seq_len") or job.model.gpt.seq_len)
    samples = steps * knobs.batch_size * knobs.num_workers
    peaks = m.get("peak_memory_bytes_per_worker") or []
    above = m.get("peak_memory_above_baseline_bytes_per_worker") or []
    tokens_per_s = m.get("tokens_per_s")
    return {
        "time_to_quality_s": ttq,
        "reached_target": first is not None,
        "steps_to_quality": first["step"] if first else None,
        "val_loss_at_quality": first["val_loss"] if first else None,
        "final_val_loss": m.get("val_loss"),
        "val_curve": [{k: e.get(k) for k in ("step", "val_loss", "validated")} for e in curve],
        "num_validated_checkpoints": sum(1 for e in curve if e.get("validated")),
        "steps": steps,
        "samples": samples,
        "tokens_seen": m.get("tokens_seen"),
        "tokens_per_s": tokens_per_s,  # steady state (first step excluded), summed over workers
        "samples_per_s": tokens_per_s / seq_len if tokens_per_s else None,
        "peak_memory_bytes": max(peaks) if peaks else None,  # the largest worker's
        "peak_memory_above_baseline_bytes": max(above) if above else None,
        "mfu": m.get("mfu"),
        "data_wait_fraction": m.get("data_wait_fraction"),
        "train_wall_s": wall,  # submit to finish: the basis of train_cpu_s and of the cost to quality
        "fit_wall_s": outcome.manifest.get("wall_s"),
        "train_cpu_s": knobs.num_workers * spec.train.cpus_per_worker * wall,  # declared; metered ones replace it
        "metered_since": t0, "metered_until": t0 + wall,
        "metered_placement_group": next((w.get("placement_group_id") for w in m.get("per_worker") or []
                                         if w.get("placement_group_id")), None),
        "train_run_id": outcome.run_id,
        "dataset_version": outcome.manifest.get("dataset_version"),
        "registered": [r["version"] for r in m.get("registered") or []],
        "energy_j": energy_j,
        "energy_note": meter.note if energy_j is None else "",
        "unavailable": unavailable,  # merged with the pricing gaps by price_outcomes
    }
