"""The ``serve`` stage of ``factory run``: deploy the fresh model version, a short bounded burst, remove it.

Deploys the completions app declaratively (as ``factory serve deploy`` does), sends a bounded closed-loop
burst on 127.0.0.1 (a mix of repeated deterministic prompts, sampled ones, and both SLO classes), and
reports p50/p95/p99, the cache hit ratio and the tenant's counted usage.

On a shared cluster the stage touches only its own application (a fresh name per run): it reuses a running
Serve (its port), never shuts Serve down and never replaces or deletes another application.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid

from aifactory.pipeline.runner import RunContext, StageResult

BURST_REQUESTS = 120
CONCURRENCY = 8


def serve_stage(ctx: RunContext) -> StageResult:
    from aifactory.bench.runner import ensure_serve
    from aifactory.cluster.connect import auth_headers, ray_env
    from aifactory.exceptions import FactoryError
    from aifactory.serve import deploy
    from aifactory.registry import ModelRegistry
    from aifactory.serve.config import AutoscalingSpec, CompletionsArgs, Limits, SLOClassConfig
    from aifactory.bench.loadgen import OK, classify, closed_loop
    from aifactory.serve.usage import tenant_usage

    name, version = ctx.artifacts.get("model_name"), ctx.artifacts.get("model_version")
    if not name:
        raise FactoryError("the serve stage needs a registered model: run the train stage first (no model_name)")
    port = ensure_serve(log=ctx.log)  # a running Serve keeps its port and its other applications
    rest = deploy.ServeREST(ctx.address.dashboard_url, auth_headers(ray_env(ctx.home)),
                            lock_dir=ctx.home.root / "serve" / "locks")
    one = AutoscalingSpec(min_replicas=1, max_replicas=1, slo_aware=False)
    # The limits must fit the freshly trained model's context window (the app refuses limits that do not).
    seq_len = int(ModelRegistry(ctx.home).get(name, version).model_config["seq_len"])
    max_tokens = min(32, seq_len // 4)
    args = CompletionsArgs(
        model_name=name, model_version=version, home=str(ctx.home.root),
        limits=Limits(max_prompt_tokens=seq_len - max_tokens, max_tokens=max_tokens),
        interactive=SLOClassConfig(num_cpus=0.25, autoscaling=one),
        batch=SLOClassConfig(num_cpus=0.25, autoscaling=one, max_ongoing_requests=64, max_queued_requests=256),
        canary=SLOClassConfig(num_cpus=0.25, autoscaling=one),
    )
    app = f"run-{ctx.tenant.tenant}-{uuid.uuid4().hex[:8]}"  # this run's own application, no one else's
    t0 = time.monotonic()
    try:
        deploy.launch_app(rest, deploy.completions_entry(args, name=app, route_prefix=f"/{app}"), args,
                          home=ctx.home, tenant=ctx.tenant, http_port=port, wait_s=180)
        deploy_s = time.monotonic() - t0
        ctx.log(f"  serve: {name}:{version} deployed in {deploy_s:.1f}s on http://127.0.0.1:{port}/{app}")
        base = f"http://127.0.0.1:{port}/{app}"
        prompts = ["def main():", "import os\n", "class Config:", "for i in range(", "# sum two numbers\n"]

        def body(i: int) -> dict:
            # Two thirds deterministic over a few prompts (cache hits after the first), one third sampled.
            if i % 3:
                return {"model": name, "prompt": prompts[i % len(prompts)], "max_tokens": 16, "temperature": 0}
            return {"model": name, "prompt": f"x{i} = ", "max_tokens": 16, "temperature": 0.8}

        headers = {"X-Tenant": ctx.tenant.tenant}
        result = asyncio.run(closed_loop(f"{base}/v1/completions", body, concurrency=CONCURRENCY,
                                         total=BURST_REQUESTS, headers=headers))
        s = result.metrics()
        status_req = urllib.request.Request(f"{base}/v1/status", headers=headers)  # scoped to the tenant
        with urllib.request.urlopen(status_req, timeout=30) as resp:
            status = json.loads(resp.read())
        time.sleep(1.0)  # replicas flush usage deltas every 0.5 s
        usage = tenant_usage(app).get(ctx.tenant.tenant, {})
        hit_ratio = (status.get("exact_cache") or {}).get("hit_ratio", 0.0)
        ok = s["num_ok"] == s["num_requests"]
        return StageResult(
            ok=ok,
            summary={
                "model": f"{name}:{version}", "deploy_s": round(deploy_s, 1), "requests": s["num_requests"],
                "ok": s["num_ok"], **{k: round(s[m], 1) if s[m] is not None else None for k, m in (
                    ("rps", "throughput_rps"), ("p50_ms", "p50_ms"), ("p95_ms", "p95_ms"), ("p99_ms", "p99_ms"))},
                "cache_hit_ratio": round(hit_ratio, 3),
                "tenant_requests": usage.get("requests"), "tenant_tokens": usage.get("tokens"),
                # Each successful request's latency, for the run report's histogram (not in the summary table).
                "_latencies_ms": [round(lat * 1e3, 2) for lat, st in zip(result.latencies_s, result.statuses)
                                  if classify(st) == OK],
            },
            note="" if ok else f"({s['num_requests'] - s['num_ok']} requests failed)",
        )
    finally:
        deploy.delete_app(rest, app)  # only this run's application: Serve and the others keep running
