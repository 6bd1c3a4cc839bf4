"""Serving on Ray Serve: batching policy, SLO classes, admission, tenancy, caches, autoscaling, rollout.

The pure parts (configs, OpenAI schemas, caches, rate limits, canary split, autoscaling maths) import
neither Ray nor torch, so unit tests and the CLI use them cheaply. The Serve deployments live in
``serve_apps/``; they combine these parts. Map of the package:

- ``config``: typed configs (batching, SLO classes, admission, caches, app args)
- ``schemas``: OpenAI-compatible request/response models and 4xx error bodies naming the field
- ``tenants``: the tenant of a request (``X-Tenant`` header or API key)
- ``ratelimit``: per-tenant token buckets (429 + Retry-After)
- ``cache``: exact response cache, semantic cache, prefix (KV state) cache
- ``routing``: canary split maths and rollout state
- ``canary_gate``: gated canaries: a plan of steps and abort/promote bounds judged over a sliding window
- ``shadow``: shadow traffic: deterministic sample by request id, the spend cap that stops it, the paired report
- ``autoscaling``: the SLO-aware custom autoscaling policy (queue depth + ongoing + p95 vs SLO)
- ``metrics`` / ``usage``: per-tenant Ray metrics and the ``tenant_usage(app_name)`` reader
- ``engine``: loading a registry model version (sha256-verified) and KV-cached, prefix-cached decoding
- ``http``: FastAPI error handlers shared by the apps
- ``deploy``: declarative deploys through Serve's REST API (deploy, status, canary, promote, rollback)
- ``stage``: the ``serve`` stage of ``factory run``
"""
