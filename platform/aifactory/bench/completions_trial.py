"""The ``serve-completions`` trial kind: the real completions app under a bounded ``POST /v1/completions`` load.

The app is :func:`aifactory.serve.apps.completions.build` with :class:`CompletionsArgs` made from the trial's
knobs: the deployment of the knob's SLO class gets ``num_replicas`` fixed replicas (autoscaling pinned, so
the configuration is what is measured), the knob's ``@serve.batch`` settings and ``replica_num_cpus`` each;
the other SLO class and the canary keep one idle replica of ``completions.idle_num_cpus``. Requests carry
``X-SLO-Class`` so they reach the measured deployment, and ``X-Tenant`` with the sweep's tenant.

Unless ``completions.caches`` is set, the exact and prefix caches are off (a benchmark with repeated prompts
would otherwise measure the cache), and the per-tenant rate limit is off (one tenant sends all the load).
Tokens are counted from each answer's ``usage``: ``tokens_per_s`` and the cost per 1M tokens are over the
generated (completion) tokens.
"""

from __future__ import annotations

from typing import Any

from aifactory.bench.spec import ServingKnobs, SweepSpec, TrialConfig


def pin_model(spec: SweepSpec, home) -> tuple[SweepSpec, str]:
    """The spec with its model version resolved (newest servable when unset) and its requests checked against the
    model's context window; returns it with ``name:version``. Every trial then serves the same version."""
    from aifactory.data.tokenizer import ByteTokenizer
    from aifactory.exceptions import ConfigError
    from aifactory.registry import ModelRegistry

    c = spec.completions
    mv = ModelRegistry(home).get(c.model_name, c.model_version)
    seq_len = int(mv.model_config.get("seq_len") or 0)
    problems = []
    if seq_len and c.max_tokens >= seq_len:
        problems.append(f"completions.max_tokens ({c.max_tokens}) must be below {mv.ref}'s seq_len ({seq_len})")
    elif seq_len:
        tok = ByteTokenizer()
        too_long = [p for p in c.prompts if len(tok.encode(p)) > seq_len - c.max_tokens]
        if too_long:
            problems.append(f"completions.prompts: {len(too_long)} prompt(s) longer than {mv.ref}'s seq_len ({seq_len}) "
                            f"minus max_tokens ({c.max_tokens}), e.g. {too_long[0][:40]!r}")
    if problems:
        raise ConfigError(f"sweep spec {spec.name!r}", problems)
    pinned = spec.model_copy(update={"completions": c.model_copy(update={"model_version": mv.version})})
    return pinned, mv.ref


def completions_args(spec: SweepSpec, knobs: ServingKnobs, *, home_root: str | None, seq_len: int):
    """The app's arguments for one configuration."""
    from aifactory.serve.config import (
        AdmissionConfig, AutoscalingSpec, BatchingConfig, CacheConfig, CompletionsArgs, Limits, SLOClassConfig,
        batch_class, interactive_class,
    )

    c = spec.completions
    base = interactive_class() if knobs.slo_class.value == "interactive" else batch_class()
    pinned = AutoscalingSpec(min_replicas=knobs.num_replicas, max_replicas=knobs.num_replicas, slo_aware=False)
    measured = base.model_copy(update={
        "batching": BatchingConfig(max_batch_size=knobs.max_batch_size, batch_wait_timeout_s=knobs.batch_wait_timeout_s),
        # A replica must take a full batch at once, or max_batch_size could never be reached.
        "max_ongoing_requests": max(base.max_ongoing_requests, knobs.max_batch_size),
        "num_cpus": spec.replica_num_cpus,
        "autoscaling": pinned,
    })
    idle = SLOClassConfig(num_cpus=c.idle_num_cpus,
                          autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=1, slo_aware=False))
    interactive, batch = (measured, idle) if knobs.slo_class.value == "interactive" else (idle, measured)
    return CompletionsArgs(
        model_name=c.model_name, model_version=c.model_version, home=home_root,
        interactive=interactive, batch=batch, canary=idle,
        admission=AdmissionConfig(default_rate_limit=None),
        cache=CacheConfig(exact_enabled=c.caches, semantic_enabled=False, prefix_enabled=c.caches),
        limits=Limits(max_prompt_tokens=max(seq_len - c.max_tokens, 1), max_tokens=c.max_tokens),
        default_slo_class=knobs.slo_class.value,
    )


def serve_completions_trial(spec: SweepSpec, trial: TrialConfig, env) -> dict[str, Any]:
    from aifactory.bench.trials import app_name, ensure_app, measure_load, metered_fields
    from aifactory.home import FactoryHome
    from aifactory.registry import ModelRegistry

    if env.http_port is None:
        raise RuntimeError("serving trials need Serve's HTTP port; the runner starts Serve first")
    c = spec.completions
    knobs = ServingKnobs.model_validate(trial.knobs)
    home = FactoryHome.from_env(env.home_root)
    mv = ModelRegistry(home).get(c.model_name, c.model_version)

    def build():
        from aifactory.serve.apps.completions import app_builder

        seq_len = int(mv.model_config.get("seq_len") or 0)
        return app_builder(completions_args(spec, knobs, home_root=str(home.root), seq_len=seq_len))

    deploy_s = ensure_app(trial, env, build)
    url = f"http://127.0.0.1:{env.http_port}/{app_name(env.run_id, trial.config_id)}/v1/completions"
    headers = {"X-Tenant": env.tenant, "X-SLO-Class": knobs.slo_class.value}

    def body(i: int) -> dict[str, Any]:
        return {"model": c.model_name, "prompt": c.prompts[i % len(c.prompts)], "max_tokens": c.max_tokens,
                "temperature": c.temperature, "seed": trial.seed * 1_000_003 + i if c.temperature > 0 else None}

    tokens = {"prompt": 0, "completion": 0}

    def count(resp) -> None:
        usage = resp.json().get("usage") or {}
        tokens["prompt"] += int(usage.get("prompt_tokens") or 0)
        tokens["completion"] += int(usage.get("completion_tokens") or 0)

    result, energy_j, energy_note = measure_load(spec, url, body, headers=headers, on_ok=count)
    metrics: dict[str, Any] = result.metrics()
    metrics.update(
        deploy_s=deploy_s,
        status_counts=result.status_counts,
        model_version=mv.ref,
        prompt_tokens=tokens["prompt"],
        completion_tokens=tokens["completion"],
        tokens=tokens["completion"],  # the unit of work priced per 1M tokens: generated tokens
        tokens_per_s=tokens["completion"] / result.wall_s if result.wall_s > 0 else None,
        # Every replica of the app (ingress and idle deployments included) is what the service costs.
        replica_cpu_s=spec.app_cpus(trial.knobs) * result.wall_s,  # declared; metered ones replace it
        loadgen_cpu_s=spec.trial_num_cpus * result.wall_s,
        **metered_fields(result, app_name(env.run_id, trial.config_id)),
        energy_j=energy_j,
        energy_note=energy_note,
    )
    return metrics
