"""The ``serve-embeddings`` trial kind: the real MiniLM app under a bounded ``POST /v1/embeddings`` load.

The app is :func:`aifactory.serve.apps.embeddings.build` with :class:`EmbeddingsArgs` from the trial's knobs:
``num_replicas`` fixed replicas (autoscaling pinned) of ``replica_num_cpus`` each, the knob's ``@serve.batch``
settings (``max_batch_size: 1`` is the app's unbatched path). The per-tenant rate limit is off (one tenant
sends all the load). ``tokens_per_s`` and the cost per 1M tokens are over the embedded tokens the answers
report in ``usage``.
"""

from __future__ import annotations

from typing import Any

from aifactory.bench.spec import ServingKnobs, SweepSpec, TrialConfig


def embeddings_args(spec: SweepSpec, knobs: ServingKnobs):
    from aifactory.serve.config import AdmissionConfig, AutoscalingSpec, BatchingConfig, EmbeddingsArgs

    default = EmbeddingsArgs()
    return EmbeddingsArgs(
        batching=BatchingConfig(max_batch_size=knobs.max_batch_size, batch_wait_timeout_s=knobs.batch_wait_timeout_s),
        # A replica must take a full batch at once, or max_batch_size could never be reached.
        max_ongoing_requests=max(default.max_ongoing_requests, knobs.max_batch_size),
        autoscaling=AutoscalingSpec(min_replicas=knobs.num_replicas, max_replicas=knobs.num_replicas, slo_aware=False),
        num_cpus=spec.replica_num_cpus,
        max_inputs=max(default.max_inputs, spec.embeddings.inputs_per_request),
        admission=AdmissionConfig(default_rate_limit=None),
    )


def serve_embeddings_trial(spec: SweepSpec, trial: TrialConfig, env) -> dict[str, Any]:
    from aifactory.bench.trials import app_name, ensure_app, measure_load, metered_fields

    if env.http_port is None:
        raise RuntimeError("serving trials need Serve's HTTP port; the runner starts Serve first")
    knobs = ServingKnobs.model_validate(trial.knobs)
    args = embeddings_args(spec, knobs)

    def build():
        from aifactory.serve.apps.embeddings import app_builder

        return app_builder(args)

    deploy_s = ensure_app(trial, env, build)
    url = f"http://127.0.0.1:{env.http_port}/{app_name(env.run_id, trial.config_id)}/v1/embeddings"
    texts, k = spec.embeddings.texts, spec.embeddings.inputs_per_request

    def body(i: int) -> dict[str, Any]:
        return {"model": args.model_id, "input": [texts[(i * k + j) % len(texts)] for j in range(k)]}

    tokens = {"n": 0}

    def count(resp) -> None:
        tokens["n"] += int((resp.json().get("usage") or {}).get("prompt_tokens") or 0)

    result, energy_j, energy_note = measure_load(spec, url, body, headers={"X-Tenant": env.tenant}, on_ok=count)
    metrics: dict[str, Any] = result.metrics()
    metrics.update(
        deploy_s=deploy_s,
        status_counts=result.status_counts,
        inputs=result.num_ok * k,
        tokens=tokens["n"],  # embedded tokens: the unit of work priced per 1M tokens
        tokens_per_s=tokens["n"] / result.wall_s if result.wall_s > 0 else None,
        replica_cpu_s=spec.app_cpus(trial.knobs) * result.wall_s,  # declared; metered ones replace it
        loadgen_cpu_s=spec.trial_num_cpus * result.wall_s,
        **metered_fields(result, app_name(env.run_id, trial.config_id)),
        energy_j=energy_j,
        energy_note=energy_note,
    )
    return metrics
