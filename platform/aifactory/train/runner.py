"""The trainer assembly on the driver: resolve the dataset, build the ``TorchTrainer``, run it, and write
the run manifest. Needs a connected Ray driver (entrypoints call ``ray.init``; this module never does)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.config import config_hash
from aifactory.exceptions import ConfigError, FactoryError
from aifactory.home import FactoryHome, is_uri
from aifactory.train import runs
from aifactory.train.config import TrainJob


class TrainingFailed(FactoryError):
    def __init__(self, run_id: str, reason: str):
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"training run {run_id} failed: {reason}; its manifest and checkpoints are kept")

    def __reduce__(self):
        return (self.__class__, (self.run_id, self.reason))


@dataclass
class TrainOutcome:
    run_id: str
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    @property
    def model_version(self) -> str | None:
        reg = self.metrics.get("registered") or []
        return reg[-1]["version"] if reg else None

    @property
    def model_name(self) -> str:
        return self.manifest["job"]["model"]["name"]

    @property
    def final_val_loss(self) -> float | None:
        return self.metrics.get("val_loss")


def _record_cost_events(home: FactoryHome, job: TrainJob, run_id: str, manifest: dict[str, Any]) -> None:
    """Tell the cost ledger about the run's outcome, so "cost per validated checkpoint" counts failed runs too.

    Keys are derived from the run id, so recording the same outcome twice counts once.
    """
    import ray

    from aifactory.cost.ledger import Ledger

    ledger = Ledger(home.ledger_path)
    job_id = ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    common = {"tenant": job.tenant.tenant, "project": job.tenant.project, "job_id": job_id}
    ledger.record_event(key=f"{run_id}:run", kind="run", **common)
    if manifest["status"] == "failed":
        ledger.record_event(key=f"{run_id}:failed", kind="run_failed", **common)
    for i, _ in enumerate((manifest.get("metrics") or {}).get("restarts") or []):
        ledger.record_event(key=f"{run_id}:retry:{i}", kind="retry", **common)
    for reg in (manifest.get("metrics") or {}).get("registered") or []:
        ledger.record_event(key=f"{run_id}:validated:{reg['version']}", kind="checkpoint_validated", **common)


def pin_dataset(job: TrainJob, home: FactoryHome, *, checksum: bool = True):
    """Resolve the job's dataset version (newest when unset), check it fits the job, and pin it.

    ``checksum``: also re-hash its shards (False where each run that follows checks them anyway)."""
    from aifactory.data.store import DatasetStore

    version = DatasetStore(home).get(job.data.dataset_version)
    m = version.manifest
    problems = []
    if m.vocab_size > job.model.gpt.vocab_size:
        problems.append(f"model.gpt.vocab_size ({job.model.gpt.vocab_size}) is below the dataset's vocab_size ({m.vocab_size})")
    n_train = len(version.files("train"))
    if n_train < job.scaling.num_workers:
        problems.append(f"scaling.num_workers ({job.scaling.num_workers}) exceeds the {n_train} train shards of {version.version}")
    if not version.files("validation"):
        problems.append(f"data.dataset_version: {version.version} has no validation split")
    if problems:
        raise ConfigError(f"train job on {version.version}", problems)
    version.validate(splits=["train", "validation"], checksum=checksum)
    return job.model_copy(update={"data": job.data.model_copy(update={"dataset_version": version.version})}), version


def run_training(
    job: TrainJob, *, home: FactoryHome, run_id: str | None = None, parent_run: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> TrainOutcome:
    """Run ``job`` on the connected cluster; return the outcome (raises TrainingFailed on failure)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from aifactory.provenance import code_version
    from aifactory.train.loop import WorkerPayload, train_loop_per_worker
    from aifactory.train.parallel import backend_for, resolve_use_gpu

    home = home.ensure()
    job, version = pin_dataset(job, home)
    run_id = run_id or runs.new_run_id()
    use_gpu = resolve_use_gpu(job.scaling.use_gpu, cluster_gpus=ray.cluster_resources().get("GPU", 0))
    storage = job.checkpoint.storage_path or home.checkpoints
    if not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    code = code_version()
    payload = WorkerPayload(
        job=job, run_id=run_id, home_root=str(home.root),
        run_storage_dir=None if is_uri(storage) else str(Path(storage) / run_id),
        code_version=str(code), config_hash=config_hash(job), parent_run=parent_run,
    )
    manifest: dict[str, Any] = {
        "run_id": run_id, "kind": "train", "status": "running", "tenant": job.tenant.tenant,
        "project": job.tenant.project, "job": job.model_dump(mode="json"), "dataset_version": version.version,
        "code_version": str(code), "config_hash": payload.config_hash, "seed": job.seed, "parent_run": parent_run,
        "use_gpu": use_gpu, "backend": backend_for(use_gpu), "storage_path": storage, "started_at": runs.utc_now(),
    }
    runs.write_manifest(home, run_id, manifest)
    log(f"train {run_id}: {job.model.name} {job.sharding}+{job.precision} on {job.scaling.num_workers} "
        f"{'GPU' if use_gpu else 'CPU'} workers, dataset {version.version}, {job.steps} steps")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": job.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend=backend_for(use_gpu)),
        run_config=RunConfig(
            name=run_id, storage_path=storage,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep_last),
        ),
    )
    t0 = time.monotonic()
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as err:  # Ray wraps worker errors in TrainingFailedError; keep the first line
        result, error = None, err
    manifest["wall_s"] = round(time.monotonic() - t0, 2)
    manifest["finished_at"] = runs.utc_now()
    if result is not None:
        manifest["metrics"] = dict(result.metrics or {})
        manifest["checkpoint_path"] = getattr(result.checkpoint, "path", None)
    if error is not None:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        runs.write_manifest(home, run_id, manifest)
        _record_cost_events(home, job, run_id, manifest)
        raise TrainingFailed(run_id, manifest["error"])
    manifest["status"] = "succeeded"
    runs.write_manifest(home, run_id, manifest)
    _record_cost_events(home, job, run_id, manifest)
    log(f"train {run_id}: done in {manifest['wall_s']:.1f}s, val_loss {manifest['metrics'].get('val_loss')}")
    return TrainOutcome(run_id, manifest)


def rerun(run_id: str, *, home: FactoryHome, log: Callable[[str], None] = lambda msg: None) -> tuple[TrainOutcome, dict[str, Any]]:
    """Re-execute a run from its manifest (same job, dataset version, seed); compare validation curves.

    Injected faults are not replayed: a rerun reproduces the training, and a run that was killed and
    resumed must match one that was not.
    """
    from aifactory.train.config import FaultSpec

    old = runs.read_manifest(home, run_id)
    job = TrainJob.model_validate(old["job"]).model_copy(update={"faults": FaultSpec()})
    outcome = run_training(job, home=home, parent_run=run_id, log=log)
    comparison = runs.compare_curves(old.get("metrics", {}).get("val_curve", []), outcome.metrics.get("val_curve", []))
    outcome.manifest["rerun_of"] = {"run_id": run_id, **comparison}
    runs.write_manifest(home, outcome.run_id, outcome.manifest)
    return outcome, comparison
