"""The trainer assembly on the driver: resolve the dataset, build the ``TorchTrainer``, run it, and write
the run manifest. Needs a connected Ray driver (entrypoints call ``ray.init``; this module never does)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.config import config_hash
from aifactory.exceptions import ConfigError, FactoryError, Preempted, error_line
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


def record_outcome_events(handle, manifest: dict[str, Any]) -> None:
    """The run's retries and validated checkpoints as cost events of its workload (``run`` and
    ``run_failed`` come from the launch path), so "cost per validated checkpoint" counts failed runs too.
    Resuming after a preemption is not a retry: the run did not fail, it was asked to make room."""
    metrics = manifest.get("metrics") or {}
    retries = [r for r in metrics.get("restarts") or [] if r.get("cause") != "preemption"]
    for i, _ in enumerate(retries):
        handle.event("retry", f"retry:{i}")
    for reg in metrics.get("registered") or []:
        handle.event("checkpoint_validated", f"validated:{reg['version']}")


def train_workload(job: TrainJob, *, use_gpu: bool, kind=None, name: str | None = None, lane: str | None = None):
    """The workload a training run is launched as: its tenant, its lane, and workers x per-worker resources."""
    from aifactory.tenancy import WorkloadKind
    from aifactory.workloads import DEFAULT_LANE, Workload

    return Workload(kind=kind or WorkloadKind.TRAIN, tenant=job.tenant, name=name or job.model.name,
                    lane=lane or DEFAULT_LANE, resources=job.scaling.resources(use_gpu=use_gpu),
                    config_hash=config_hash(job))


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
    log: Callable[[str], None] = lambda msg: None, within: str | None = None,
    connect: Callable[[], object] | None = None, cluster_gpus: float | None = None, lane: str | None = None,
) -> TrainOutcome:
    """Launch ``job`` on the connected cluster through the front door (admission, run record, cost events);
    return the outcome (raises QuotaExceeded/BudgetExceeded before anything starts, TrainingFailed on
    failure, Preempted when it yielded: see :mod:`aifactory.train.yielding`); the ``run_id`` of a preempted
    run resumes it from the checkpoint it yielded at. ``within``: the admitted workload this run is part of
    (a sweep's trial), see ``launch``.
    ``connect`` (with ``cluster_gpus``, what the cluster has, for ``use_gpu`` left unset): start the Ray driver
    only after admission, so a refused run leaves no driver job behind (``factory train`` does)."""
    import ray

    from aifactory.train.parallel import resolve_use_gpu
    from aifactory.train.yielding import request_path
    from aifactory.workloads import launch

    if not ray.is_initialized() and connect is None:
        raise FactoryError("run_training needs a connected Ray driver: call it from an entrypoint "
                           "(`factory train`, `python -m jobs.train`) or after ray.init(), or pass connect=")
    home = home.ensure()
    if cluster_gpus is None:
        if not ray.is_initialized():
            raise FactoryError("run_training(connect=...) needs cluster_gpus: how many GPUs the cluster has")
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = resolve_use_gpu(job.scaling.use_gpu, cluster_gpus=cluster_gpus)
    run_id = run_id or runs.new_run_id()
    request_path(home, run_id)  # a run id is a directory name (runs, checkpoints): refuse one that is not, up front
    return launch(train_workload(job, use_gpu=use_gpu, lane=lane), home=home, record_id=run_id, within=within, connect=connect,
                  run=lambda handle: _fit(job, home=home, handle=handle, use_gpu=use_gpu, parent_run=parent_run,
                                          log=log))


def fit_trainer(train_loop, payload: dict[str, Any], *, run_id: str, storage: str, num_workers: int,
                cpus_per_worker: float, use_gpu: bool, max_failures: int, keep_last: int | None,
                callbacks: list | None = None):
    """The Ray Train launch every trainer of the factory shares (training, distillation): a TorchTrainer on
    ``num_workers`` workers, gloo or NCCL by device, DCP checkpoints under ``storage/run_id`` (benchmark
    trials add Tune's report callback). Returns
    ``(result or None, error or None)``: Ray wraps worker errors in TrainingFailedError."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from aifactory.train.parallel import backend_for

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend=backend_for(use_gpu)),
        run_config=RunConfig(
            name=run_id, storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_last),
            callbacks=callbacks,
            # Ray Train v2's verbosity control: its own INFO chatter stays in Ray's train log files, off the
            # console. It filters only `ray.train*` loggers: the per-report "Reporting training result ...
            # TrainingReport(...)" line comes from a logger named by file path (ray 2.60,
            # train/v2/_internal/execution/context.py), which `factory run` sends to its log file instead.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
        return result, getattr(result, "error", None)
    except Exception as err:  # noqa: BLE001 - returned to the caller, which records it in the run manifest
        return None, err


def storage_of(job: TrainJob, home: FactoryHome) -> str:
    storage = job.checkpoint.storage_path or home.checkpoints
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def _fit(job: TrainJob, *, home: FactoryHome, handle, use_gpu: bool, parent_run: str | None,
         log: Callable[[str], None]) -> TrainOutcome:
    from aifactory.provenance import code_version
    from aifactory.registry.service import Registration
    from aifactory.train.loop import WorkerPayload, train_loop_per_worker
    from aifactory.train.parallel import backend_for
    from aifactory.train.yielding import clear_yield

    run_id = handle.id
    previous = runs.read_manifest(home, run_id) if runs.manifest_path(home, run_id).is_file() else None
    resuming = previous is not None and previous.get("status") == "preempted"
    if resuming and job.data.dataset_version is None:  # the data it yielded on, not a newer version
        job = job.model_copy(update={"data": job.data.model_copy(update={"dataset_version": previous["dataset_version"]})})
    job, version = pin_dataset(job, home)
    if resuming:
        if config_hash(job) != previous.get("config_hash"):
            raise ConfigError(f"resume of preempted run {run_id}", [
                f"job: config hash {config_hash(job)} differs from the preempted run's {previous.get('config_hash')}; "
                "resume it with the job it ran (its manifest's `job`), or start a new run id"])
        # The request it honoured is done with; one written since is for this attempt, which honours it.
        honoured = previous["preemptions"][-1]
        if honoured.get("request_id"):
            clear_yield(home, run_id, request_id=honoured["request_id"])
        else:
            clear_yield(home, run_id)
    # A job the control plane launched registers through it with its grant (the tenant is the grant's, not
    # job.tenant); the operator's own runs register in-process, which needs the signing key.
    registration = Registration.from_env()
    storage = storage_of(job, home)
    code = code_version()
    payload = WorkerPayload(
        job=job, run_id=run_id, home_root=str(home.root),
        run_storage_dir=None if is_uri(storage) else str(Path(storage) / run_id),
        code_version=str(code), config_hash=config_hash(job), parent_run=parent_run,
        registration=registration.to_dict() if registration.url else None,
    )
    manifest: dict[str, Any] = {
        "run_id": run_id, "kind": "train", "status": "running", "tenant": job.tenant.tenant,
        "project": job.tenant.project, "job": job.model_dump(mode="json"), "dataset_version": version.version,
        "code_version": str(code), "config_hash": payload.config_hash, "seed": job.seed, "parent_run": parent_run,
        "use_gpu": use_gpu, "backend": backend_for(use_gpu), "storage_path": storage, "started_at": runs.utc_now(),
        "preemptions": list(previous.get("preemptions") or []) if resuming else [],
    }
    if resuming:
        manifest["resumed_from_step"] = previous["preemptions"][-1]["step"]
    runs.write_manifest(home, run_id, manifest)
    handle.ref("run_id", run_id)
    log(f"train {run_id}: {job.model.name} {job.sharding}+{job.precision} on {job.scaling.num_workers} "
        f"{'GPU' if use_gpu else 'CPU'} workers, dataset {version.version}, {job.steps} steps")
    t0 = time.monotonic()
    result, error = fit_trainer(train_loop_per_worker, payload.model_dump(mode="json"), run_id=run_id,
                                storage=storage, num_workers=job.scaling.num_workers,
                                cpus_per_worker=job.scaling.cpus_per_worker, use_gpu=use_gpu,
                                max_failures=job.max_failures, keep_last=job.checkpoint.keep_last)
    manifest["wall_s"] = round(time.monotonic() - t0, 2)
    manifest["finished_at"] = runs.utc_now()
    if result is not None:
        manifest["metrics"] = dict(result.metrics or {})
        manifest["checkpoint_path"] = getattr(result.checkpoint, "path", None)
    preempted = manifest.get("metrics", {}).get("preempted") if error is None else None
    manifest["status"] = "failed" if error is not None else "preempted" if preempted else "succeeded"
    if error is not None:
        manifest["error"] = error_line(error)
    if preempted:
        manifest["preempted"] = preempted
        manifest["preemptions"].append(preempted)
    else:
        clear_yield(home, run_id)  # it ended without honouring a request: nothing is left to yield
    runs.write_manifest(home, run_id, manifest)
    record_outcome_events(handle, manifest)
    if error is not None:
        raise TrainingFailed(run_id, manifest["error"])
    if preempted:
        log(f"train {run_id}: preempted at step {preempted['step']} after {manifest['wall_s']:.1f}s; "
            f"resume with the same run id")
        raise Preempted(run_id, preempted["step"], preempted.get("reason") or "")
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
