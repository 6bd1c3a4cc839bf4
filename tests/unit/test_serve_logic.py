"""Serving logic without Ray: schemas and 4xx errors, caches, rate limits, canary split, autoscaling maths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aifactory.serve.autoscaling import SLOAwarePolicy, desired_replicas
from aifactory.serve.cache import ExactCache, PrefixCache, SemanticCache
from aifactory.serve.config import AutoscalingSpec, CompletionsArgs, RateLimit, SLOClassConfig
from aifactory.serve.ratelimit import TenantRateLimiter
from aifactory.serve.routing import RolloutState, pick_target
from aifactory.serve.schemas import APIError, CompletionRequest, EmbeddingRequest, check_completion_limits, parse_body
from aifactory.serve.tenants import resolve_slo_class, resolve_tenant

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# ---- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,param", [
    (b"{oops", "body"),
    (b"[1, 2]", "body"),
    (json.dumps({"prompt": "x"}).encode(), "model"),
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "m", "prompt": "x", "temperature": 3}).encode(), "temperature"),
    (json.dumps({"model": "m", "prompt": {"a": 1}}).encode(), "prompt"),
    (json.dumps({"model": "m", "prompt": "x", "bogus": 1}).encode(), "bogus"),
])
def test_bad_completion_bodies_name_the_field(raw, param):
    with pytest.raises(APIError) as exc:
        parse_body(CompletionRequest, raw)
    assert exc.value.status == 400
    assert exc.value.body()["error"]["param"] == param
    assert param in exc.value.message


def test_limits_name_the_field():
    req = parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": "x", "max_tokens": 100}).encode())
    with pytest.raises(APIError) as exc:
        check_completion_limits(req, prompt_tokens=1, max_prompt_tokens=10, max_tokens_limit=64)
    assert exc.value.param == "max_tokens" and "64" in exc.value.message
    req = parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": "x" * 20}).encode())
    with pytest.raises(APIError) as exc:
        check_completion_limits(req, prompt_tokens=20, max_prompt_tokens=10, max_tokens_limit=64)
    assert exc.value.param == "prompt"
    check_completion_limits(req, prompt_tokens=10, max_prompt_tokens=10, max_tokens_limit=64)


def test_deterministic_requests_and_embedding_inputs():
    assert CompletionRequest(model="m", prompt="x", temperature=0).deterministic
    assert CompletionRequest(model="m", prompt="x", temperature=1, seed=3).deterministic
    assert not CompletionRequest(model="m", prompt="x", temperature=1).deterministic
    assert EmbeddingRequest(model="e", input="a").inputs() == ["a"]
    with pytest.raises(APIError) as exc:
        CompletionRequest(model="m", prompt=["a", "b"]).prompt_text()
    assert exc.value.param == "prompt"


def test_tenant_and_slo_class_resolution():
    keys = {"sk-1": "alpha"}
    assert resolve_tenant({"x-tenant": "beta", "authorization": "Bearer sk-1"}, keys) == "beta"
    assert resolve_tenant({"authorization": "Bearer sk-1"}, keys) == "alpha"
    assert resolve_tenant({}, keys) == "unattributed"
    with pytest.raises(APIError) as exc:
        resolve_tenant({"authorization": "Bearer nope"}, keys)
    assert exc.value.status == 401 and exc.value.param == "Authorization"
    with pytest.raises(APIError) as exc:
        resolve_tenant({"x-tenant": "Not_Valid"}, keys)
    assert exc.value.status == 400 and exc.value.param == "X-Tenant"
    assert resolve_slo_class({}, "/completions/v1/completions", "interactive") == "interactive"
    assert resolve_slo_class({}, "/completions/batch/v1/completions", "interactive") == "batch"
    assert resolve_slo_class({"x-slo-class": "Batch"}, "/v1/completions", "interactive") == "batch"
    with pytest.raises(APIError):
        resolve_slo_class({"x-slo-class": "gold"}, "/v1/completions", "interactive")


# ---- caches -------------------------------------------------------------------------------------

def test_exact_cache_keys_ttl_size_and_tenants():
    clock = Clock()
    c = ExactCache(ttl_s=10, max_entries=2, clock=clock)
    k_a1 = ExactCache.key("a", "v1", prompt="p", max_tokens=4, stop=["x"])
    c.put(k_a1, "answer")
    assert c.get(k_a1) == "answer"
    assert c.get(ExactCache.key("b", "v1", prompt="p", max_tokens=4, stop=["x"])) is None  # other tenant
    assert c.get(ExactCache.key("a", "v2", prompt="p", max_tokens=4, stop=["x"])) is None  # new version
    assert c.get(ExactCache.key("a", "v1", prompt="p", max_tokens=5, stop=["x"])) is None  # other request
    clock.t += 11
    assert c.get(k_a1) is None  # expired
    for i in range(3):
        c.put(ExactCache.key("a", "v1", prompt=str(i)), i)
    assert len(c) == 2 and c.get(ExactCache.key("a", "v1", prompt="0")) is None  # LRU evicted the oldest
    assert c.stats.hit_ratio("a") == pytest.approx(1 / 5) and c.stats.hit_ratio("b") == 0.0


def test_semantic_cache_threshold_scope_ttl_and_size():
    clock = Clock()
    c = SemanticCache(threshold=0.9, ttl_s=10, max_entries=2, clock=clock)
    scope = SemanticCache.scope("a", "v1", max_tokens=4)
    c.put(scope, [1.0, 0.0, 0.0], "cat")
    hit = c.get(scope, [0.99, 0.05, 0.0])
    assert hit is not None and hit[0] == "cat" and hit[1] > 0.9
    assert c.get(scope, [0.0, 1.0, 0.0]) is None  # dissimilar
    assert c.get(SemanticCache.scope("b", "v1", max_tokens=4), [1.0, 0.0, 0.0]) is None  # other tenant
    assert c.get(SemanticCache.scope("a", "v2", max_tokens=4), [1.0, 0.0, 0.0]) is None  # other version
    clock.t += 11
    assert c.get(scope, [1.0, 0.0, 0.0]) is None and len(c) == 0  # expired and dropped
    for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        c.put(scope, v, str(v))
    assert len(c) == 2 and c.get(scope, [1, 0, 0]) is None


def test_prefix_cache_longest_block_prefix_and_version():
    c = PrefixCache(max_entries=3, block_tokens=4)
    toks = list(range(11))
    assert c.candidate_lengths(11) == [8, 4]
    assert c.candidate_lengths(8) == [4]  # the last token is always recomputed
    c.put("v1", toks[:4], "s4", tenant="a")
    c.put("v1", toks[:8], "s8", tenant="a")
    assert c.lookup("v1", toks, tenant="a") == (8, "s8")
    assert c.lookup("v1", toks[:8] + [99], tenant="a") == (8, "s8")
    assert c.lookup("v1", toks[:6], tenant="a") == (4, "s4")
    assert c.lookup("v2", toks, tenant="a") is None
    assert c.lookup("v1", [7] * 11, tenant="a") is None
    assert c.lookup("v1", toks, tenant="b") is None  # another tenant never hits a's prefixes
    assert c.stats.hits.get("b", 0) == 0 and c.stats.lookups["b"] == 1
    assert ("a", "v1", toks[:4]) in c and ("b", "v1", toks[:4]) not in c
    for i in range(3):
        c.put("v1", [100 + i] * 4, i, tenant="a")
    assert len(c) == 3 and ("a", "v1", toks[:4]) not in c


# ---- admission ----------------------------------------------------------------------------------

def test_rate_limiter_per_tenant_with_retry_after():
    clock = Clock()
    rl = TenantRateLimiter(RateLimit(rps=1, burst=2), {"vip": RateLimit(rps=100, burst=100)}, clock=clock)
    assert [rl.check("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    assert rl.check("b") == 0.0  # tenants do not share buckets
    assert all(rl.check("vip") == 0.0 for _ in range(50))
    clock.t += 1.0
    assert rl.check("a") == 0.0 and rl.check("a") >= 1.0
    slow = TenantRateLimiter(RateLimit(rps=0.1, burst=1), clock=clock)
    slow.check("x")
    assert slow.check("x") == 10.0
    assert TenantRateLimiter(None, clock=clock).check("anyone") == 0.0


# ---- rollout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("percent", [0, 1, 10, 25, 33.3, 50, 99, 100])
def test_canary_split_is_exact_over_any_window(percent):
    for n in (100, 1000):
        hits = sum(pick_target(i, percent) == "canary" for i in range(n))
        assert abs(hits - n * percent / 100) <= 1


def test_rollout_state_transitions():
    s = RolloutState(stable_version="v1")
    c = s.canary("v2", 10)
    assert (c.canary_version, c.canary_percent) == ("v2", 10)
    assert c.promote() == RolloutState(stable_version="v2")
    assert c.rollback() == RolloutState(stable_version="v1")
    with pytest.raises(ValueError, match="no canary"):
        s.promote()
    with pytest.raises(ValueError, match="canary_version"):
        RolloutState(stable_version="v1", canary_percent=5)


# ---- autoscaling --------------------------------------------------------------------------------

def _d(**kw):
    base = dict(current=2, ongoing=8, queued=0, p95_s=0.1, p95_slo_s=0.5, target_ongoing_requests=4,
                min_replicas=1, max_replicas=8)
    return desired_replicas(**(base | kw))


def test_autoscaling_policy_maths():
    assert _d() == 2  # 8 ongoing / 4 per replica
    assert _d(queued=8) == 4  # queued requests count as load
    assert _d(ongoing=2, p95_s=0.9) == 4  # p95 1.8x the SLO doubles (at most 2x per step)
    assert _d(ongoing=2, p95_s=0.55) == 3  # slightly over the SLO: one more replica
    assert _d(ongoing=1, p95_s=0.4) == 2  # load says 1, but p95 near the SLO holds capacity
    assert _d(ongoing=1, p95_s=0.1) == 1  # well under the SLO: scale down
    assert _d(ongoing=100) == 8 and _d(ongoing=0, p95_s=None) == 1  # clamped to [min, max]
    assert _d(current=0, ongoing=3) == 1


def test_policy_reads_ray_context():
    class Ctx:
        current_num_replicas = 1
        total_num_requests = 12.0
        total_queued_requests = 4.0
        aggregated_metrics = {"p95_latency_s": {"r1": 0.2, "r2": 0.3}}
        capacity_adjusted_min_replicas = 1
        capacity_adjusted_max_replicas = 10
        policy_state = {}

    policy = SLOAwarePolicy(p95_slo_s=1.0, target_ongoing_requests=4, min_replicas=1, max_replicas=5)
    desired, state = policy(Ctx())
    assert desired == 3 and state["last_p95_s"] == 0.3


def test_configs_render_ray_options():
    cls = SLOClassConfig(autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=3))
    auto = cls.autoscaling.to_serve(p95_slo_s=cls.p95_slo_s)
    assert auto["policy"]["policy_function"] == "aifactory.serve.autoscaling:SLOAwarePolicy"
    assert auto["policy"]["policy_kwargs"]["p95_slo_s"] == 0.5
    with pytest.raises(ValueError, match="max_replicas"):
        AutoscalingSpec(min_replicas=3, max_replicas=2)
    args = CompletionsArgs(model_name="m")
    assert args.interactive.batching.batch_wait_timeout_s < args.batch.batching.batch_wait_timeout_s
    assert args.interactive.max_queued_requests < args.batch.max_queued_requests


# ---- shipped Serve configs ----------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "serve_apps").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_config_yaml_is_valid(path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from aifactory.serve.config import EmbeddingsArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.http_options.host == "127.0.0.1"
    for app in config.applications:
        module = app.import_path.split(":")[0].split(".")[-1]
        args_cls = {"completions": CompletionsArgs, "embeddings": EmbeddingsArgs}[module]
        args_cls.model_validate(app.args)  # the app's own args validate too
