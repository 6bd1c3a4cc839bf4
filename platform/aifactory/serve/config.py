"""Typed serving configs: batching policy, SLO classes, admission, caches and the apps' arguments.

Every deployment knob comes from here (never from literals in ``serve_apps/``). ``to_serve_*`` methods turn
them into the dicts Ray Serve takes, so the same values appear in a Serve config YAML and in ``serve run``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aifactory.config import StrictModel
from aifactory.serve.admission import AdaptiveAdmission
from aifactory.tenancy import TenantName


class BatchingConfig(StrictModel):
    """Dynamic batching of model calls (``@serve.batch``)."""

    max_batch_size: int = Field(8, ge=1, le=1024, description="Most requests one model call takes.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=10.0, description="Longest a request waits for others to fill a batch."
    )


class ContinuousBatchingConfig(StrictModel):
    """Iteration-level batching of a completions replica (``aifactory.serve.engine_cb``): the budgets each step
    of the engine respects. Every step, finished sequences leave and waiting ones join."""

    max_num_seqs: int = Field(
        32, ge=1, le=4096, description="Most sequences in the running batch at once (rows that hold KV state).")
    max_tokens_per_step: int = Field(
        256, ge=1, le=1 << 16,
        description="Token budget of one step: each running decode takes 1 and goes first; prompts are prefilled in "
        "chunks from what is left, so a long prompt never stalls the running decodes. Larger: faster prefill, "
        "slower steps (more time between a decode's tokens).")
    kv_block_tokens: int = Field(
        16, ge=1, le=4096, description="Positions per KV-cache block, the unit in which sequences get KV memory.")
    kv_blocks: int | None = Field(
        None, ge=1,
        description="KV-cache blocks of the replica; null = enough for max_num_seqs sequences of the model's full "
        "seq_len (never preempts). Fewer bound the memory: when none is free, the lowest-priority newest sequence is "
        "preempted and recomputed later.")
    priority_preemption: bool = Field(
        True, description="A waiting interactive request may preempt a running batch-class one to get a row or KV "
        "blocks (the batch request is recomputed later), so a batch flood cannot hold the batch against it.")

    @model_validator(mode="after")
    def _decodes_fit(self) -> ContinuousBatchingConfig:
        if self.max_tokens_per_step < self.max_num_seqs:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) < max_num_seqs ({self.max_num_seqs}): "
                             "every running sequence decodes one token per step, so the budget must hold them all")
        return self


class AutoscalingSpec(StrictModel):
    """Replica autoscaling of one deployment; ``slo_aware`` adds the p95-vs-SLO custom policy."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Ongoing requests per replica to aim at.")
    upscale_delay_s: float = Field(3.0, ge=0, description="How long a scale-up decision must hold.")
    downscale_delay_s: float = Field(10.0, ge=0, description="How long a scale-down decision must hold.")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(3.0, gt=0, description="Window the load is averaged over.")
    slo_aware: bool = Field(
        True, description="Use aifactory's composite policy (queue depth, ongoing requests, observed p95 vs SLO)."
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        problems = []
        if self.max_replicas < self.min_replicas:
            problems.append(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.look_back_period_s < self.metrics_interval_s:
            problems.append(
                f"look_back_period_s ({self.look_back_period_s}) < metrics_interval_s ({self.metrics_interval_s})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_serve(self, *, p95_slo_s: float) -> dict:
        """Ray Serve's ``autoscaling_config`` dict."""
        cfg: dict = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": max(self.min_replicas, 1),
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.slo_aware:
            cfg["policy"] = {
                "policy_function": "aifactory.serve.autoscaling:SLOAwarePolicy",
                "policy_kwargs": {
                    "p95_slo_s": p95_slo_s,
                    "target_ongoing_requests": self.target_ongoing_requests,
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                },
            }
        return cfg


class SLOClassConfig(StrictModel):
    """One service-level class: its own deployment, batching, queue limit and autoscaling."""

    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching policy.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        32, ge=1, description="Requests waiting for this deployment before new ones are rejected (429)."
    )
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a rejection.")
    p95_slo_s: float = Field(0.5, gt=0, description="Latency objective: p95 of model calls, seconds.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica autoscaling.")
    num_cpus: float = Field(0.5, gt=0, description="Logical CPUs each replica reserves.")
    engine: Literal["continuous", "static"] = Field(
        "continuous",
        description="'continuous': one iteration-level engine loop per replica (aifactory.serve.engine_cb): requests "
        "join and leave the running batch every decode step, prompts of any length together, knobs in `continuous`. "
        "'static': @serve.batch groups a window's arrivals and decodes them to the end, by prompt length (knobs in "
        "`batching`).")
    continuous: ContinuousBatchingConfig = Field(
        default_factory=ContinuousBatchingConfig, description="Budgets of the continuous engine (engine 'continuous').")

    def deployment_options(self) -> dict:
        """Keyword arguments for ``Deployment.options``."""
        from ray.serve.config import BackpressureConfig

        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=self.retry_after_s),
            "autoscaling_config": self.autoscaling.to_serve(p95_slo_s=self.p95_slo_s),
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }


def interactive_class() -> SLOClassConfig:
    """Short batch window and a tight queue: latency first."""
    return SLOClassConfig(
        batching=BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.005),
        max_ongoing_requests=16,
        max_queued_requests=32,
        p95_slo_s=0.5,
    )


def batch_class() -> SLOClassConfig:
    """Large batches, a long window and a deep queue: throughput first."""
    return SLOClassConfig(
        batching=BatchingConfig(max_batch_size=32, batch_wait_timeout_s=0.05),
        max_ongoing_requests=64,
        max_queued_requests=256,
        retry_after_s=5.0,
        p95_slo_s=5.0,
        autoscaling=AutoscalingSpec(target_ongoing_requests=32),
    )


class RateLimit(StrictModel):
    """A token bucket: ``rps`` sustained, ``burst`` at once."""

    rps: float = Field(gt=0, description="Sustained requests per second.")
    burst: int = Field(ge=1, description="Requests admitted at once from a full bucket.")


class AdmissionConfig(StrictModel):
    """Per-tenant rate limits enforced at the ingress (per ingress replica)."""

    default_rate_limit: RateLimit | None = Field(
        default_factory=lambda: RateLimit(rps=200, burst=400),
        description="Limit of every tenant without its own entry; null for none.",
    )
    tenant_rate_limits: dict[str, RateLimit] = Field(default_factory=dict, description="Per-tenant limits.")
    request_timeout_s: float = Field(30.0, gt=0, description="A model call slower than this answers 504.")
    adaptive: AdaptiveAdmission | None = Field(
        None, description="A latency objective instead of fixed bounds: each replica sizes its in-flight limit from "
        "measured latency (aifactory.serve.admission) and answers the excess 429 at once; null = the fixed "
        "max_ongoing_requests/max_queued_requests.")


class CacheConfig(StrictModel):
    """Response caches (exact and semantic) and the prefix cache of KV state."""

    exact_enabled: bool = Field(True, description="Cache answers of deterministic requests.")
    exact_ttl_s: float = Field(300.0, gt=0, description="Lifetime of an exact-cache entry.")
    exact_max_entries: int = Field(4096, ge=1, description="Size bound of the exact cache (LRU).")
    semantic_enabled: bool = Field(False, description="Cache answers by prompt similarity (MiniLM embeddings).")
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="Cosine similarity needed for a hit.")
    semantic_ttl_s: float = Field(300.0, gt=0, description="Lifetime of a semantic-cache entry.")
    semantic_max_entries: int = Field(1024, ge=1, description="Size bound of the semantic cache (LRU).")
    prefix_enabled: bool = Field(True, description="Reuse KV state of shared prompt prefixes.")
    prefix_max_entries: int = Field(64, ge=1, description="KV states kept (LRU).")
    prefix_block_tokens: int = Field(16, ge=1, description="Prefixes are cached at multiples of this length.")


class Limits(StrictModel):
    """Request limits checked before any model work (violations answer 400 naming the field).

    The token limits default from the served model (:meth:`fit`): a prompt and its answer must fit in the
    model's ``seq_len`` positions, so fixed defaults (once 192 + 64) broke every model with a shorter context
    (the tiny recipe's 128)."""

    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt, in tokens; null = the served model's seq_len minus max_tokens.")
    max_tokens: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask for; null = what max_prompt_tokens leaves of "
        "the served model's seq_len (a quarter of it when both are null), at most 64.")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body, in bytes (larger answers 413 before it is parsed)."
    )


    def fit(self, seq_len: int) -> Limits:
        """These limits for a model of ``seq_len`` positions: unset token limits derived from it, set ones checked
        against it (a ConfigError naming the fields when they do not fit)."""
        max_tokens, prompt = self.max_tokens, self.max_prompt_tokens
        if max_tokens is None:  # what the prompt leaves, else a quarter of the context; at most 64 either way
            max_tokens = max(1, min(64, seq_len // 4 if prompt is None else seq_len - prompt))
        if prompt is None:
            prompt = seq_len - max_tokens
        if prompt < 1 or prompt + max_tokens > seq_len:
            from aifactory.exceptions import ConfigError

            raise ConfigError("completions args", [
                f"limits: max_prompt_tokens ({prompt}) + max_tokens ({max_tokens}) exceeds the served model's "
                f"seq_len ({seq_len}); lower them, or leave them unset to fit the model"])
        return self.model_copy(update={"max_prompt_tokens": prompt, "max_tokens": max_tokens})


INGRESS_NUM_CPUS = 0.25
"""Logical CPUs the completions app's ingress replica reserves (routing and caches; the model runs elsewhere)."""


class CompletionsArgs(StrictModel):
    """Arguments of ``serve_apps.completions:app_builder``."""

    model_name: str = Field(description="Registered model name.")
    model_version: str | None = Field(None, description="Stable version; null = the newest servable one.")
    canary_version: str | None = Field(None, description="Version taking canary_percent of traffic.")
    canary_percent: float = Field(0.0, ge=0, le=100, description="Share of traffic sent to the canary.")
    home: str | None = Field(None, description="Factory home holding the registry (default $AIFACTORY_HOME).")
    interactive: SLOClassConfig = Field(default_factory=interactive_class, description="Interactive SLO class.")
    batch: SLOClassConfig = Field(default_factory=batch_class, description="Batch SLO class.")
    canary: SLOClassConfig = Field(default_factory=interactive_class, description="The canary deployment.")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig, description="Rate limits, timeouts.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Caches.")
    limits: Limits = Field(default_factory=Limits, description="Request limits (token limits default from the "
                           "served model's seq_len).")
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (auth 'header' only).")
    auth: Literal["header", "factory-keys"] = Field(
        "header",
        description="'header': X-Tenant or api_keys (local, or behind the control API); 'factory-keys': every "
        "request needs a factory API key from the hashed key store under the home, and the key decides the tenant.",
    )
    tenants: list[TenantName] | None = Field(
        None, description="Only these tenants may call the app (a tenant's own app, deployed by the control API); "
        "null = any tenant. Enforced on the resolved tenant, so with 'factory-keys' it cannot be claimed.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress/router.")
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="Concurrent requests per ingress replica.")
    ingress_max_queued_requests: int = Field(512, ge=1, description="Requests waiting for the ingress.")
    default_slo_class: Literal["interactive", "batch"] = Field("interactive", description="Class without a header.")

    def fitted_to(self, model_config: dict) -> CompletionsArgs:
        """These args for the model they serve (a registry version's ``model_config``): see :meth:`Limits.fit`."""
        from aifactory.models.config import GPTConfig

        seq_len = int(model_config.get("seq_len") or GPTConfig().seq_len)
        return self.model_copy(update={"limits": self.limits.fit(seq_len)})

    def resources(self):
        """What the app holds at its peak: each model deployment's max replicas x CPUs per replica, plus the
        ingress replicas (admission counts the peak, since autoscaling may reach it unasked)."""
        from aifactory.workloads.spec import Resources

        total = Resources.per_unit(self.ingress_replicas, cpu=INGRESS_NUM_CPUS)
        for c in (self.interactive, self.batch, self.canary):
            total = total + Resources.per_unit(c.autoscaling.max_replicas, cpu=c.num_cpus)
        return total


class EmbeddingsArgs(StrictModel):
    """Arguments of ``serve_apps.embeddings:app_builder``."""

    model_id: str = Field("all-MiniLM-L6-v2", description="Name reported in responses and /v1/models.")
    batching: BatchingConfig = Field(
        default_factory=lambda: BatchingConfig(max_batch_size=64, batch_wait_timeout_s=0.01),
        description="Dynamic batching of encode calls; max_batch_size 1 disables batching.",
    )
    max_ongoing_requests: int = Field(128, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting before 429.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a rejection.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica autoscaling.")
    p95_slo_s: float = Field(0.5, gt=0, description="Latency objective used by the autoscaling policy.")
    num_cpus: float = Field(0.5, gt=0, description="Logical CPUs per replica.")
    torch_threads: int = Field(
        1, ge=1, le=256,
        description="torch intra-op threads per replica. 1 where the replica shares its cores with the ingress and "
        "Ray: on 2 cores with the same admission bound, 1 thread answered 195 req/s at 280 req/s offered (p99 0.49 s), "
        "2 threads 141-150 req/s at 380 offered (p99 0.88-1.26 s); raise it on a node with cores to spare.",
    )
    max_inputs: int = Field(256, ge=1, description="Most inputs one request may send.")
    max_input_chars: int = Field(8192, ge=1, description="Longest input string.")
    max_body_bytes: int = Field(
        8 << 20, ge=1024,
        description="Largest request body, in bytes (larger answers 413 before it is parsed); the default holds "
        "max_inputs texts of max_input_chars ASCII characters with room to spare.",
    )

    def resources(self):
        """What the app holds at its peak: max replicas x CPUs per replica."""
        from aifactory.workloads.spec import Resources

        return Resources.per_unit(self.autoscaling.max_replicas, cpu=self.num_cpus)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig, description="Rate limits.")
    home: str | None = Field(None, description="Factory home holding the API key store (default $AIFACTORY_HOME).")
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (auth 'header' only).")
    auth: Literal["header", "factory-keys"] = Field(
        "header",
        description="'header': X-Tenant or api_keys (local, or behind the control API); 'factory-keys': every "
        "request needs a factory API key from the hashed key store under the home, and the key decides the tenant.",
    )
