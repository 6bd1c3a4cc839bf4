"""Run a sweep as Ray Tune trials on the connected cluster, then store, price and summarise it.

The caller (an entrypoint: ``factory bench run``, ``factory run``, a test) has already connected to Ray;
the driver's job metadata carries the tenant, and every Tune trial, Serve replica and Train worker the
sweep starts belongs to that job. Trials are sized to fit: each reserves ``trial_num_cpus`` through
``tune.with_resources`` and the sweep runs at most as many at once as the cluster's CPUs hold (replicas
or Train workers included). A spec whose single trial cannot fit is refused before anything starts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifactory.cluster.local import free_port
from aifactory.bench.context import collect_context
from aifactory.bench.results import ResultStore, RunRecord, TrialRecord, new_run_id
from aifactory.bench.spec import SweepSpec, TrialConfig, TrialKind
from aifactory.bench.trials import APP_PREFIX, TrialEnv, run_trial
from aifactory.exceptions import ClusterError, ConfigError
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class SweepOutcome:
    run: RunRecord
    trials: list[TrialRecord]
    location: str


def ensure_serve(log: Callable[[str], None] = _stderr) -> int:
    """Serve's HTTP port on this cluster, starting Serve on 127.0.0.1 (a free port) if it is not running."""
    from ray import serve

    from aifactory import ray_compat

    port = ray_compat.serve_http_port()
    if port is None:
        port = free_port()
        log(f"starting Serve on 127.0.0.1:{port}")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        port = ray_compat.serve_http_port()
    return int(port)


def _trainable(config: dict[str, Any], *, spec_json: str, env: TrialEnv) -> None:
    from ray import tune

    spec = SweepSpec.model_validate_json(spec_json)
    trial = TrialConfig.model_validate(config["trial"])
    metrics = run_trial(spec, trial, env)
    # Nested values travel as JSON strings: Tune flattens dicts into "a/b" keys otherwise.
    tune.report({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in metrics.items()})


def _progress_callback(total: int, log: Callable[[str], None]):
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.done = 0
            self.t0 = time.monotonic()

        def _line(self, trial, what: str) -> None:
            self.done += 1
            tc = trial.config["trial"]
            elapsed = time.monotonic() - self.t0
            eta = elapsed / self.done * (total - self.done)
            log(f"  [{self.done}/{total}] {tc['config_id']} repeat {tc['repeat']}: {what} "
                f"({elapsed:.0f}s elapsed, ~{eta:.0f}s left)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "throughput_rps" in r:
                what = (f"{r['throughput_rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                        f"{r['num_errors']} errors") if r.get("throughput_rps") is not None else "no successful request"
                if r.get("tokens_per_s") is not None:
                    what += f", {r['tokens_per_s']:.1f} tokens/s"
            else:
                ttq = r.get("time_to_quality_s")
                what = (f"time-to-quality {ttq:.1f}s" if ttq is not None else "target not reached") + \
                    f", val loss {r.get('final_val_loss', float('nan')):.4f}"
            self._line(trial, what)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return Progress()


def plan_concurrency(spec: SweepSpec, trials: list[TrialConfig], cluster_cpus: float) -> int:
    """Trials at once: the spec's limit, cut to what the cluster's CPUs hold. Refuses a trial that cannot fit."""
    need = max(spec.per_trial_cpus(t.knobs) for t in trials)
    if need > cluster_cpus:
        worst = max(trials, key=lambda t: spec.per_trial_cpus(t.knobs))
        raise ConfigError(f"sweep spec {spec.name!r}", [
            f"configuration {worst.config_id}: one trial needs {need:g} CPUs (trial_num_cpus + replicas/workers), "
            f"the cluster has {cluster_cpus:g}; lower replica_num_cpus / train.cpus_per_worker or the grid"])
    return max(1, min(spec.max_concurrent_trials, math.floor(cluster_cpus / need)))


def run_sweep(
    spec: SweepSpec,
    *,
    home: FactoryHome,
    tenant: TenantRef | None = None,
    dataset_version: str | None = None,
    model_version: str | None = None,
    log: Callable[[str], None] = _stderr,
    lane: str | None = None,
) -> SweepOutcome:
    """Launch ``spec`` through the front door (admission, run record, cost events) and run every trial on
    the connected cluster; store the records; return them. ``lane``: the lane it runs in (default factory)."""
    import ray
    from ray import tune

    from aifactory.bench.outcomes import price_outcomes
    from aifactory.config import config_hash
    from aifactory.tenancy import WorkloadKind
    from aifactory.workloads import DEFAULT_LANE, Resources, Workload, launch

    if not ray.is_initialized():
        raise ClusterError("run_sweep needs a connected Ray cluster: call it from an entrypoint "
                           "(`factory bench run`) or after ray.init()")
    if tenant is not None:
        spec = spec.model_copy(update={"tenant": tenant})
    # The kinds on factory artifacts resolve them once, here: every trial uses the same version, and the
    # context records the version measured rather than what the caller believed.
    if spec.kind is TrialKind.SERVE_COMPLETIONS:
        from aifactory.bench.completions_trial import pin_model

        spec, model_version = pin_model(spec, home)
    elif spec.kind is TrialKind.TRAIN_GPT:
        from aifactory.bench.gpt_trial import pin_dataset

        spec = pin_dataset(spec, home)
        dataset_version = spec.gpt.dataset_version
    trials = spec.trials()
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    concurrency = plan_concurrency(spec, trials, cluster_cpus)
    run_id = new_run_id(spec.name)
    # What the sweep holds at once: its widest trial times the trials Tune runs side by side.
    peak_cpus = max(spec.per_trial_cpus(t.knobs) for t in trials) * concurrency
    workload = Workload(kind=WorkloadKind.BENCH, tenant=spec.tenant, name=f"bench {spec.name}",
                        lane=lane or DEFAULT_LANE, resources=Resources(cpu=peak_cpus), config_hash=config_hash(spec))

    def sweep(handle) -> SweepOutcome:
        handle.ref("bench_run", run_id)
        started = time.time()
        context = collect_context(dataset_version=dataset_version, model_version=model_version, region=spec.region,
                                  flags={"serve_replica_omp_num_threads": 1} if spec.kind.family == "serving" else None)
        http_port = ensure_serve(log) if spec.kind.family == "serving" else None
        env = TrialEnv(run_id=run_id, tenant=spec.tenant.tenant, http_port=http_port,
                       storage_path=home.bench.rstrip("/") + "/_train", home_root=str(home.root))
        configs = len({t.config_id for t in trials})
        log(f"bench {run_id}: {configs} configuration(s) x {spec.repeats} repeats = {len(trials)} {spec.kind.value} "
            f"trials, {concurrency} at a time, tenant {spec.tenant}")

        trainable = tune.with_resources(
            tune.with_parameters(_trainable, spec_json=spec.model_dump_json(), env=env),
            {"cpu": spec.trial_num_cpus},
        )
        store = ResultStore(home)
        tuner = tune.Tuner(
            trainable,
            # A grid over the expanded list keeps Tune's trial order = the spec's order (repeats adjacent).
            param_space={"trial": tune.grid_search([t.model_dump() for t in trials])},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name=run_id,
                storage_path=home.bench.rstrip("/") + "/_tune",
                verbose=0,
                callbacks=[_progress_callback(len(trials), log)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        try:
            grid = tuner.fit()
        finally:
            if http_port is not None:
                _delete_apps(run_id)

        by_key = {}
        for result in grid:
            tc = result.config["trial"] if result.config else None
            if tc is not None:
                by_key[(tc["config_id"], tc["repeat"])] = result
        book, reason = _price_book(home)
        region = context.region
        records = []
        for t in trials:
            result = by_key.get((t.config_id, t.repeat))
            error = None if result is not None and result.error is None else str(getattr(result, "error", "not run"))
            metrics: dict[str, Any] = {}
            if error is None:
                metrics = {k: _decode(v) for k, v in (result.metrics or {}).items() if not _tune_internal(k)}
                held, why = _metered(metrics)
                metrics.update(price_outcomes(metrics, family=spec.kind.family, book=book, region=region,
                                              tenant=spec.tenant.tenant, unavailable_reason=reason,
                                              metered=held, metered_reason=why))
            records.append(TrialRecord(
                run_id=run_id, spec_name=spec.name, kind=spec.kind.value, tenant=spec.tenant.tenant,
                project=spec.tenant.project, config_id=t.config_id, knobs=t.knobs, repeat=t.repeat, seed=t.seed,
                status="ok" if error is None else "error", error=error, metrics=metrics))
        run = RunRecord(
            run_id=run_id, spec_name=spec.name, kind=spec.kind.value, tenant=spec.tenant.tenant,
            project=spec.tenant.project, spec=spec.model_dump(mode="json"), context=context.model_dump(mode="json"),
            pricing={"price_book_version": book.version if book else None, "region": region,
                     "basis": "metered: what the state API and the GCS actor table show the trial's Serve "
                              "replicas (over the measured load) or Train workers (over the run) holding, each "
                              "resource at its node's SKU; a trial's cost_basis says where it fell back to "
                              "declared resources x wall time",
                     "unavailable": reason or None},
            started_at=started, finished_at=time.time(), num_trials=len(records),
            num_failed=sum(r.status != "ok" for r in records),
        )
        location = store.write(run, records)
        log(f"bench {run_id}: {len(records) - run.num_failed}/{len(records)} trials ok in {run.wall_s:.0f}s; "
            f"records in {location}")
        return SweepOutcome(run=run, trials=records, location=location)

    return launch(workload, home=home, record_id=run_id, run=sweep)


def _price_book(home: FactoryHome):
    try:
        from aifactory.cost.pricebook import load_price_book
    except ImportError as err:  # the cost component is optional at runtime: costs become "unavailable"
        return None, f"no price book ({err})"
    return load_price_book(home=home), ""


_TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
              "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "config"}


def _metered(metrics: dict[str, Any]):
    """What the meter reads the trial's actors holding over its interval (``cost.metered``), or why not."""
    from aifactory import ray_compat
    from aifactory.cost.metered import held_by

    since, until = metrics.get("metered_since"), metrics.get("metered_until")
    app, group = metrics.get("metered_app"), metrics.get("metered_placement_group")
    if since is None or until is None or not (app or group):
        return None, "the trial named no interval or actors to meter"
    try:
        held = held_by(since=float(since), until=float(until), dashboard_url=ray_compat.dashboard_url(),
                       apps=[app] if app else [], placement_groups=[group] if group else [])
    except Exception as err:  # noqa: BLE001 - the declared basis is used instead, and the record says why
        return None, f"the state API could not be read: {type(err).__name__}: {err}"[:300]
    if not held.spans:
        return None, f"no actors of {held.missing or [app or group]} held anything in the trial's interval"
    return held, ""


def _tune_internal(key: str) -> bool:
    return key in _TUNE_KEYS or key.startswith("config/")


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _delete_apps(run_id: str) -> None:
    from ray import serve

    from aifactory import ray_compat

    for name in list(serve.status().applications):
        if name.startswith(f"{APP_PREFIX}{run_id}-"):
            ray_compat.serve_delete_nowait(name)
