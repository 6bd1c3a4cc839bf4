"""Declarative deploys through Serve's REST API: deploy, status, shutdown, canary, promote, rollback.

Everything goes through the dashboard's ``PUT /api/serve/applications/`` with the full declarative config
(the apps this call does not touch are sent back unchanged, since a PUT deletes declarative apps it does
not list). Changes of ``user_config`` only (canary percentage, weights version, batch window) are applied
by Serve in place, without restarting replicas, unlike ``serve.run`` (../shared/RAY-2.60-NOTES.md).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from aifactory.exceptions import ClusterUnreachable, FactoryError, NotFound
from aifactory.serve.config import CompletionsArgs, EmbeddingsArgs
from aifactory.serve.routing import RolloutState

COMPLETIONS_IMPORT = "aifactory.serve.apps.completions:app_builder"
EMBEDDINGS_IMPORT = "aifactory.serve.apps.embeddings:app_builder"
_HTTP_KEYS = ("host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s")


class ServeDeployError(FactoryError):
    """Serve rejected a config or an application failed to reach RUNNING."""


class ServeREST:
    """A thin client of the dashboard's Serve endpoints, with the cluster's auth token."""

    def __init__(self, dashboard_url: str, headers: dict[str, str] | None = None, *, timeout_s: float = 30.0):
        from aifactory.cluster.connect import auth_headers

        self.url = dashboard_url.rstrip("/")
        self.headers = headers if headers is not None else auth_headers()
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise ServeDeployError(f"{method} {path} -> HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ClusterUnreachable(self.url, str(err)) from None
        return json.loads(raw) if raw.strip() else None

    def details(self) -> dict:
        return self._call("GET", "/api/serve/applications/") or {}

    def put(self, config: dict) -> None:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(config)  # fail here, naming the field, rather than in the controller
        self._call("PUT", "/api/serve/applications/", config)

    def delete_all(self) -> None:
        self._call("DELETE", "/api/serve/applications/")


def app_entry(name: str, *, import_path: str, args: dict, route_prefix: str,
              deployments: list[dict] | None = None, env_vars: dict[str, str] | None = None) -> dict:
    entry: dict[str, Any] = {"name": name, "route_prefix": route_prefix, "import_path": import_path,
                             "args": args}
    if env_vars:
        entry["runtime_env"] = {"env_vars": env_vars}
    if deployments:
        entry["deployments"] = deployments
    return entry


def completions_entry(args: CompletionsArgs, *, name: str = "completions", route_prefix: str = "/completions") -> dict:
    return app_entry(name, import_path=COMPLETIONS_IMPORT, args=args.model_dump(mode="json", exclude_none=True),
                     route_prefix=route_prefix)


def embeddings_entry(args: EmbeddingsArgs, *, name: str = "embeddings", route_prefix: str = "/embeddings") -> dict:
    return app_entry(name, import_path=EMBEDDINGS_IMPORT, args=args.model_dump(mode="json"), route_prefix=route_prefix,
                     env_vars={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def current_config(details: dict, *, http_port: int | None = None) -> dict:
    """The declarative config now applied (the apps deployed by config), ready to edit and PUT back."""
    http = details.get("http_options") or {}
    http_options = {k: http[k] for k in _HTTP_KEYS if http.get(k) is not None}
    if not http_options or http_options.get("host") in (None, "0.0.0.0"):
        http_options["host"] = "127.0.0.1"  # the factory keeps Serve on loopback
    if http_port and "port" not in http_options:
        http_options["port"] = http_port
    apps = [a["deployed_app_config"] for a in (details.get("applications") or {}).values()
            if a.get("deployed_app_config") and a.get("source", "declarative") != "imperative"]
    return {"proxy_location": details.get("proxy_location") or "EveryNode", "http_options": http_options,
            "applications": apps}


def deploy(rest: ServeREST, entry: dict, *, http_port: int | None = None, wait_s: float = 300.0) -> dict:
    """Add or replace one application and wait until it is RUNNING; returns its status."""
    config = current_config(rest.details(), http_port=http_port)
    config["applications"] = [a for a in config["applications"] if a["name"] != entry["name"]] + [entry]
    rest.put(config)
    return wait_running(rest, entry["name"], wait_s=wait_s)


def launch_app(rest: ServeREST, entry: dict, app_args: CompletionsArgs | EmbeddingsArgs, *, home, tenant,
               actor: str | None = None, http_port: int | None = None, wait_s: float = 300.0) -> dict:
    """Deploy an app through the front door: a ``serve`` workload of ``tenant`` holding what ``app_args`` say
    at peak (replicas x per-replica resources), admitted, recorded and metered; returns the app's status.

    The deployment runs on after this returns, so its record ends as ``started``; Serve replicas are then
    metered by application and deployment with no factory code in them.
    """
    from aifactory.tenancy import WorkloadKind
    from aifactory.workloads import Workload, launch

    workload = Workload(kind=WorkloadKind.SERVE, tenant=tenant, name=f"serve {entry['name']}",
                        resources=app_args.resources())

    def start(handle) -> dict:
        handle.ref("app", entry["name"])
        return deploy(rest, entry, http_port=http_port, wait_s=wait_s)  # raises unless RUNNING

    return launch(workload, home=home, run=start, actor=actor, detached=True)


def live_user_config(details: dict, app: str, deployment: str) -> dict:
    """The ``user_config`` a deployment of ``app`` runs with now, from :meth:`ServeREST.details`."""
    dep = (((details.get("applications") or {}).get(app) or {}).get("deployments") or {}).get(deployment) or {}
    return (dep.get("deployment_config") or {}).get("user_config") or {}


def update_deployments(rest: ServeREST, app: str, user_configs: dict[str, dict], *, wait_s: float = 120.0,
                       details: dict | None = None) -> dict:
    """Update keys of ``user_config`` of deployments of ``app`` (in place, no restarts); wait until RUNNING.

    The given keys are merged into each deployment's live ``user_config``, so one change (a canary share)
    never erases another (a cache flush token). ``details``: :meth:`ServeREST.details` if just fetched."""
    details = details if details is not None else rest.details()
    config = current_config(details)
    for entry in config["applications"]:
        if entry["name"] == app:
            overrides = {d["name"]: d for d in entry.get("deployments") or []}
            for dep, uc in user_configs.items():
                overrides.setdefault(dep, {"name": dep})["user_config"] = {**live_user_config(details, app, dep), **uc}
            entry["deployments"] = list(overrides.values())
            break
    else:
        raise NotFound("declaratively deployed Serve application", app, "deploy it with `factory serve deploy`")
    rest.put(config)
    time.sleep(0.5)  # let the controller pick the new target before polling its status
    return wait_running(rest, app, wait_s=wait_s)


def wait_running(rest: ServeREST, app: str, *, wait_s: float) -> dict:
    deadline = time.monotonic() + wait_s
    last = {}
    while time.monotonic() < deadline:
        last = (rest.details().get("applications") or {}).get(app) or {}
        status = last.get("status")
        if status == "RUNNING":
            return last
        if status == "DEPLOY_FAILED":
            raise ServeDeployError(f"application {app!r} is {status}: {last.get('message', '')[:3000]}")
        # UNHEALTHY is waited out: Serve reports it while it replaces a dead replica (seen for several
        # seconds after a replica process was killed), and a rollout step must not fail for that.
        time.sleep(0.5)
    raise ServeDeployError(f"application {app!r} not RUNNING after {wait_s:.0f}s (status {last.get('status')}): "
                           f"{(last.get('message') or '')[:2000]}")


def delete_app(rest: ServeREST, app: str, *, wait_s: float = 60.0) -> bool:
    """Remove one application; returns whether it existed."""
    details = rest.details()
    if app not in (details.get("applications") or {}):
        return False
    config = current_config(details)
    config["applications"] = [a for a in config["applications"] if a["name"] != app]
    rest.put(config)
    deadline = time.monotonic() + wait_s
    while app in (rest.details().get("applications") or {}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return True


def status(rest: ServeREST) -> list[dict]:
    """One row per deployment: application, deployment, status, replicas, user_config summary."""
    rows = []
    for name, app in sorted((rest.details().get("applications") or {}).items()):
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            uc = (dep.get("deployment_config") or {}).get("user_config") or {}
            rows.append({
                "application": name, "route": app.get("route_prefix"), "app_status": app.get("status"),
                "deployment": dep_name, "status": dep.get("status"),
                "replicas": sum(1 for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"),
                "version": uc.get("model_version") or _rollout_text(uc.get("rollout")),
            })
    return rows


def _rollout_text(rollout: dict | None) -> str | None:
    if not rollout:
        return None
    r = RolloutState.model_validate(rollout)
    return r.stable_version + (f" + {r.canary_version}@{r.canary_percent:g}%" if r.canary_version else "")


def rollout_state(rest: ServeREST, app: str) -> RolloutState:
    details = rest.details()
    if app not in (details.get("applications") or {}):
        raise NotFound("Serve application", app, "`factory serve status` lists the applications")
    uc = live_user_config(details, app, "Ingress")
    if "rollout" not in uc:
        raise NotFound("rollout state of application", app, "is it a completions app?")
    return RolloutState.model_validate(uc["rollout"])


def canary(rest: ServeREST, app: str, *, model_name: str, version: str, percent: float, registry) -> RolloutState:
    """Load ``version`` into the Canary deployment (after checking its digest here), then send it ``percent``%."""
    mv = registry.verify(registry.get(model_name, version))  # refuse a tampered artifact before touching Serve
    state = rollout_state(rest, app).canary(mv.version, percent)
    # First load the weights (traffic still 0% there), then shift traffic: no request meets a half-loaded canary.
    update_deployments(rest, app, {"Canary": {"model_version": mv.version}})
    _check_loaded(rest, app, "Canary", mv.version)
    update_deployments(rest, app, {"Ingress": {"rollout": state.model_dump()}})
    return state


def promote(rest: ServeREST, app: str, *, registry, model_name: str) -> RolloutState:
    """The canary version becomes the stable one of every SLO class; the canary share returns to 0."""
    try:
        state = rollout_state(rest, app).promote()
    except ValueError as err:
        raise ServeDeployError(str(err)) from None
    registry.verify(registry.get(model_name, state.stable_version))
    update_deployments(rest, app, {
        d: {"model_version": state.stable_version} for d in ("Interactive", "Batch")
    })
    for d in ("Interactive", "Batch"):
        _check_loaded(rest, app, d, state.stable_version)
    update_deployments(rest, app, {"Ingress": {"rollout": state.model_dump()}})
    return state


def rollback(rest: ServeREST, app: str) -> RolloutState:
    """All traffic back to the stable version (the canary deployment keeps its weights, idle)."""
    state = rollout_state(rest, app).rollback()
    update_deployments(rest, app, {"Ingress": {"rollout": state.model_dump()}})
    return state


def flush_caches(rest: ServeREST, app: str, tenant: str | None) -> str:
    """Ask every ingress replica of ``app`` to forget ``tenant``'s cached answers (all tenants' when ``None``).

    A fresh token under ``cache_flush`` in the ingress's ``user_config``: Serve applies it to each replica in
    place (:func:`aifactory.serve.cache.flush_requests`). Returns the token."""
    import uuid

    details = rest.details()
    if "Ingress" not in (((details.get("applications") or {}).get(app) or {}).get("deployments") or {}):
        raise NotFound("cache of Serve application", app)
    flushes = live_user_config(details, app, "Ingress").get("cache_flush") or {}
    token = uuid.uuid4().hex[:12]
    update_deployments(rest, app, {"Ingress": {"cache_flush": {**flushes, tenant or "*": token}}}, details=details)
    return token


def _check_loaded(rest: ServeREST, app: str, deployment: str, version: str, *, wait_s: float = 60.0) -> None:
    """Ask the ingress's status page which version ``deployment`` holds; raise if the load was refused."""
    import urllib.request

    details = rest.details()
    http = details.get("http_options") or {}
    route = ((details.get("applications") or {}).get(app) or {}).get("route_prefix") or ""
    url = f"http://127.0.0.1:{http.get('port', 8000)}{route.rstrip('/')}/v1/status"
    deadline = time.monotonic() + wait_s
    info: dict = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                info = json.loads(resp.read())["deployments"].get(deployment, {})
        except (OSError, ValueError, KeyError):
            info = {}
        if info.get("version") == version:
            return
        if info.get("last_error") and version in info["last_error"]:
            raise ServeDeployError(f"{deployment} refused {version}: {info['last_error']}")
        time.sleep(0.5)
    raise ServeDeployError(f"{deployment} did not load {version} within {wait_s:.0f}s (it reports {info})")
