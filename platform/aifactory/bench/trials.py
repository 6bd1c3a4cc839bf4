"""Trial kinds: what one Tune trial runs, and the metrics it reports.

Each kind is a function ``(spec, trial, env) -> metrics`` run inside the Tune trial's process. They measure;
they do not price (pricing happens on the driver from the recorded resource-seconds and the price book).

- ``serve-mlp``: deploy the trial's configuration of a small torch MLP behind ``@serve.batch`` (deployed
  once per configuration: the repeats of one configuration are adjacent and reuse it), drive a bounded
  HTTP load at 127.0.0.1, report throughput and p50/p95/p99.
- ``train-mlp``: see :mod:`aifactory.bench.train_trial`.
- ``serve-completions``: the real completions app, see :mod:`aifactory.bench.completions_trial`.
- ``serve-embeddings``: the real MiniLM embeddings app, see :mod:`aifactory.bench.embeddings_trial`.
- ``train-gpt``: a real :mod:`aifactory.train` run, see :mod:`aifactory.bench.gpt_trial`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifactory.bench.context import EnergyMeter, hardware
from aifactory.bench.spec import ServingKnobs, SweepSpec, TrialConfig, TrialKind

APP_PREFIX = "bench-"


@dataclass(frozen=True)
class TrialEnv:
    """What the driver hands every trial."""

    run_id: str
    tenant: str
    http_port: int | None  # Serve's HTTP port, for serving kinds
    storage_path: str | None = None  # Ray Train storage of training kinds
    home_root: str | None = None  # the factory home (registry, datasets) of the kinds that use it


def app_name(run_id: str, config_id: str) -> str:
    return f"{APP_PREFIX}{run_id}-{config_id}"


def run_trial(spec: SweepSpec, trial: TrialConfig, env: TrialEnv) -> dict[str, Any]:
    """Run one trial of ``spec.kind``; returns its metrics plus where it ran."""
    t0 = time.time()
    if spec.kind is TrialKind.SERVE_MLP:
        metrics = serve_mlp_trial(spec, trial, env)
    elif spec.kind is TrialKind.TRAIN_MLP:
        from aifactory.bench.train_trial import train_mlp_trial

        metrics = train_mlp_trial(spec, trial, env)
    elif spec.kind is TrialKind.SERVE_COMPLETIONS:
        from aifactory.bench.completions_trial import serve_completions_trial

        metrics = serve_completions_trial(spec, trial, env)
    elif spec.kind is TrialKind.SERVE_EMBEDDINGS:
        from aifactory.bench.embeddings_trial import serve_embeddings_trial

        metrics = serve_embeddings_trial(spec, trial, env)
    elif spec.kind is TrialKind.TRAIN_GPT:
        from aifactory.bench.gpt_trial import train_gpt_trial

        metrics = train_gpt_trial(spec, trial, env)
    else:  # pragma: no cover - the enum and this switch change together
        raise NotImplementedError(spec.kind)
    metrics["trial_wall_s"] = time.time() - t0
    metrics["node"] = hardware().hostname
    return metrics


def ensure_app(trial: TrialConfig, env: TrialEnv, build: Callable[[], Any]) -> float:
    """Deploy this configuration's app (``build()``) unless it already runs; returns the deploy seconds (0 when
    reused)."""
    from ray import serve

    from aifactory import ray_compat

    name = app_name(env.run_id, trial.config_id)
    apps = serve.status().applications
    if name in apps and apps[name].status == "RUNNING":
        return 0.0
    # The previous configuration of this run is done (repeats are adjacent): free its replicas. Not blocking:
    # behind the HAProxy ingress a delete waits a fixed 30 s drain (RAY-2.60-NOTES, Serve); the new app's
    # replicas simply wait for the CPUs the old ones release.
    for other in list(apps):
        if other.startswith(f"{APP_PREFIX}{env.run_id}-") and other != name:
            ray_compat.serve_delete_nowait(other)
    t0 = time.perf_counter()
    serve.run(build(), name=name, route_prefix=f"/{name}")
    return time.perf_counter() - t0


def measure_load(spec: SweepSpec, url: str, body: Callable[[int], Any], *, headers: dict[str, str] | None = None,
                 on_ok: Callable[[Any], None] | None = None):
    """The spec's warm-up, then its measured load (energy metered where NVML exists); ``on_ok`` sees only the
    measured answers. Returns ``(LoadResult, energy_j, energy_note)``."""
    from aifactory.bench.loadgen import drive_load

    load = spec.load
    if load.warmup_requests:
        drive_load(url, body, num_requests=load.warmup_requests, concurrency=load.concurrency,
                   timeout_s=load.request_timeout_s, headers=headers)
    meter = EnergyMeter()
    meter.start()
    since = time.time()
    result = drive_load(url, body, num_requests=load.num_requests, concurrency=load.concurrency,
                        timeout_s=load.request_timeout_s, headers=headers, on_ok=on_ok)
    result.started_at, result.ended_at = since, time.time()
    energy_j = meter.stop_joules()
    return result, energy_j, meter.note if energy_j is None else ""


def metered_fields(result, app: str) -> dict[str, Any]:
    """What the driver meters a serving trial by: the measured load's interval and the app's replicas."""
    return {"metered_since": result.started_at, "metered_until": result.ended_at, "metered_app": app}


def serve_mlp_trial(spec: SweepSpec, trial: TrialConfig, env: TrialEnv) -> dict[str, Any]:
    if env.http_port is None:
        raise RuntimeError("serving trials need Serve's HTTP port; the runner starts Serve first")
    def build():
        from aifactory.bench.mlp_app import build_app

        return build_app(model=spec.model, knobs=ServingKnobs.model_validate(trial.knobs),
                         replica_num_cpus=spec.replica_num_cpus, tenant=env.tenant, seed=spec.seed)

    deploy_s = ensure_app(trial, env, build)
    url = f"http://127.0.0.1:{env.http_port}/{app_name(env.run_id, trial.config_id)}"
    rng = random.Random(trial.seed)
    pool = [[rng.gauss(0.0, 1.0) for _ in range(spec.model.input_dim)] for _ in range(64)]

    def body(i: int) -> dict[str, Any]:
        return {"inputs": pool[i % len(pool)]}

    result, energy_j, energy_note = measure_load(spec, url, body)
    metrics: dict[str, Any] = result.metrics()
    metrics.update(
        deploy_s=deploy_s,
        status_counts=result.status_counts,
        # What the measured interval held: pricing turns these into dollars on the driver.
        replica_cpu_s=spec.app_cpus(trial.knobs) * result.wall_s,  # declared; metered ones replace it
        loadgen_cpu_s=spec.trial_num_cpus * result.wall_s,
        energy_j=energy_j,
        energy_note=energy_note,
        **metered_fields(result, app_name(env.run_id, trial.config_id)),
    )
    return metrics
