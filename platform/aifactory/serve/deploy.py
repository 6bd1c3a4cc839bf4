"""Declarative deploys through Serve's REST API: deploy, status, shutdown, canary, promote, rollback.

Everything goes through the dashboard's ``PUT /api/serve/applications/`` with the full declarative config
(the apps this call does not touch are sent back unchanged, since a PUT deletes declarative apps it does
not list). Changes of ``user_config`` only (canary percentage, weights version, batch window) are applied
by Serve in place, without restarting replicas, unlike ``serve.run`` (../shared/RAY-2.60-NOTES.md).

**One writer.** Ray 2.60 has no per-application declarative API (the dashboard offers only the whole-config
PUT and a per-deployment replica scale), so every change is a read-modify-write of the whole config. Two
writers interleaving their GET and PUT would drop each other's change. So:

- every read-modify-write runs under one exclusive lock (an ``flock`` on a file under the factory home,
  shared by the CLI, the control API's replicas and ``factory run`` on the head), held only for the GET and
  the PUT; the controller checkpoints a PUT's config before the PUT returns, so the next writer's GET sees it;
- a change of one application that takes several steps (deploy and wait, canary: load then shift, promote,
  rollback, delete) also holds that application's change lock for its whole duration; a second change of the
  same application meanwhile is refused with :class:`ChangeConflict` (HTTP 409 through the control API),
  naming the application and the change in progress, never queued behind it nor silently merged;
- rollout steps compare-and-set: the rollout state they computed from is checked again under the writer's
  lock before their PUT, so a writer that bypassed the locks (a raw ``serve deploy``) is detected (409);
- a cache flush merges its token into the live ``user_config`` under the writer's lock, so it never needs
  the application's change lock and takes effect beside a canary in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aifactory.exceptions import ClusterUnreachable, ConfigError, FactoryError, NotFound
from aifactory.serve.config import CompletionsArgs, EmbeddingsArgs
from aifactory.serve.routing import RolloutState

COMPLETIONS_IMPORT = "aifactory.serve.apps.completions:app_builder"
EMBEDDINGS_IMPORT = "aifactory.serve.apps.embeddings:app_builder"
_HTTP_KEYS = ("host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s")


class ServeDeployError(FactoryError):
    """Serve rejected a config or an application failed to reach RUNNING."""


class ChangeConflict(FactoryError):
    """Another change of the same Serve application is in progress, or the state a change was computed from
    moved under it (HTTP 409). Nothing of this change was applied."""

    def __init__(self, app: str, change: str, holder: str):
        self.app, self.change, self.holder = app, change, holder
        super().__init__(f"application {app!r}: {change} refused, {holder}; retry when it is done")

    def __reduce__(self):
        return (type(self), (self.app, self.change, self.holder))


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The apps that take a tenant from each request (their args have `auth`), as the library and the recipes name them.
_TENANT_AWARE_APPS = (COMPLETIONS_IMPORT, EMBEDDINGS_IMPORT, "serve_apps.completions:app_builder",
                      "serve_apps.embeddings:app_builder")


def check_exposure(host: str | None, entry: dict) -> None:
    """Refuse an app in ``auth: header`` mode where Serve listens beyond loopback.

    In header mode a request's tenant is its ``X-Tenant`` header: anyone who reaches the port could name any
    tenant (be billed as it, drain its rate limit, read its cache tags). That is acceptable only where the
    port is reachable from this machine alone; elsewhere every app must use ``auth: factory-keys``."""
    if (host or "127.0.0.1") in LOOPBACK_HOSTS or entry.get("import_path") not in _TENANT_AWARE_APPS:
        return
    if (entry.get("args") or {}).get("auth", "header") == "header":
        raise ConfigError(f"Serve application {entry.get('name')!r}", [
            f"auth: 'header' trusts the X-Tenant header and is allowed only where Serve listens on 127.0.0.1; "
            f"Serve listens on {host}: set auth: factory-keys"])


class ServeREST:
    """A thin client of the dashboard's Serve endpoints, with the cluster's auth token and the writer's locks
    (``lock_dir``: default ``<home>/serve/locks/<dashboard>``; every writer of one cluster must share it)."""

    def __init__(self, dashboard_url: str, headers: dict[str, str] | None = None, *, timeout_s: float = 30.0,
                 lock_dir: str | Path | None = None):
        from aifactory.cluster.connect import auth_headers

        self.url = dashboard_url.rstrip("/")
        self.headers = headers if headers is not None else auth_headers()
        self.timeout_s = timeout_s
        if lock_dir is None:
            from aifactory.home import FactoryHome

            lock_dir = FactoryHome.from_env().root / "serve" / "locks"
        self.lock_dir = Path(lock_dir) / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def _lock_file(self, name: str) -> int:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        return os.open(self.lock_dir / name, os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """The one writer of the cluster's Serve config: hold it for a GET-modify-PUT, nothing longer."""
        fd = self._lock_file("config.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextlib.contextmanager
    def changing(self, app: str, change: str) -> Iterator[None]:
        """Hold ``app``'s change lock for a multi-step change; :class:`ChangeConflict` if another one holds it."""
        fd = self._lock_file("app-" + hashlib.sha256(app.encode()).hexdigest()[:24] + ".lock")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another change"
                raise ChangeConflict(app, change, f"{holder} is in progress") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"a {change} (pid {os.getpid()}, since {time.strftime('%H:%M:%SZ', time.gmtime())})"
                      .encode(), 0)
            yield
        finally:
            os.close(fd)

    def mutate(self, change: Callable[[dict, dict], None], *, http_port: int | None = None) -> None:
        """One read-modify-write of the whole config under the writer's lock: ``change(config, details)``
        edits ``config`` (from :func:`current_config`) in place; it is then PUT."""
        with self.writer():
            details = self.details()
            config = current_config(details, http_port=http_port)
            change(config, details)
            self.put(config)

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
    """Add or replace one application and wait until it is RUNNING; returns its status.

    Refused (:class:`ConfigError` naming ``auth``) for a header-mode app where Serve listens beyond
    loopback, and (:class:`ChangeConflict`) while another change of the same application is in progress."""
    def add(config: dict, details: dict) -> None:
        check_exposure((details.get("http_options") or {}).get("host"), entry)
        config["applications"] = [a for a in config["applications"] if a["name"] != entry["name"]] + [entry]

    with rest.changing(entry["name"], "deploy"):
        rest.mutate(add, http_port=http_port)
        return wait_running(rest, entry["name"], wait_s=wait_s)


def fit_to_registry(home, app_args: CompletionsArgs) -> CompletionsArgs:
    """The completions args checked against the model versions they serve, before anything is deployed: token
    limits left unset default from the model's seq_len, set ones must fit it (ConfigError naming the fields).
    Every door calls it before it builds the app's entry (the CLI, the control API), so a misfit is one line
    to the user, not a DEPLOY_FAILED from inside Serve's build task."""
    from aifactory.registry import ModelRegistry

    registry = ModelRegistry(home)
    versions = [app_args.model_version] + ([app_args.canary_version] if app_args.canary_version else [])
    configs = [registry.get(app_args.model_name, v).model_config for v in versions]
    return app_args.fitted_to(min(configs, key=lambda c: int(c.get("seq_len") or 0)))


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


def target_user_config(details: dict, app: str, deployment: str) -> dict:
    """The ``user_config`` the last PUT asked ``deployment`` of ``app`` to run with: the app's
    ``deployed_app_config`` override (the controller checkpoints it before the PUT returns), else the live one.

    A merge must start from this, not from :func:`live_user_config`: the deployments' live config follows the
    target only once the controller's loop has reconciled it (a moment after the PUT), so merging into the
    live one would drop a change PUT just before (seen: a cache flush lost to the next writer's merge)."""
    cfg = (((details.get("applications") or {}).get(app) or {}).get("deployed_app_config") or {})
    for dep in cfg.get("deployments") or []:
        if dep.get("name") == deployment and dep.get("user_config") is not None:
            return dict(dep["user_config"])
    return live_user_config(details, app, deployment)


def update_deployments(rest: ServeREST, app: str, user_configs: dict[str, dict], *, wait_s: float = 120.0,
                       expect: dict[str, dict] | None = None) -> dict:
    """Update keys of ``user_config`` of deployments of ``app`` (in place, no restarts); wait until RUNNING.

    The given keys are merged into each deployment's live ``user_config`` under the writer's lock, so one
    change (a canary share) never erases another (a cache flush token). ``expect``: {deployment: {key: value}}
    that must still hold in the live ``user_config`` (a compare-and-set), else :class:`ChangeConflict`."""
    def merge(config: dict, details: dict) -> None:
        for dep, wanted in (expect or {}).items():
            live = target_user_config(details, app, dep)
            for key, value in wanted.items():
                if live.get(key) != value:
                    raise ChangeConflict(app, f"update of {dep}.{key}",
                                         f"{dep}.{key} changed since this change read it")
        for entry in config["applications"]:
            if entry["name"] == app:
                overrides = {d["name"]: d for d in entry.get("deployments") or []}
                for dep, uc in user_configs.items():
                    overrides.setdefault(dep, {"name": dep})["user_config"] = {**target_user_config(details, app, dep),
                                                                               **uc}
                entry["deployments"] = list(overrides.values())
                return
        raise NotFound("declaratively deployed Serve application", app, "deploy it with `factory serve deploy`")

    rest.mutate(merge)
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
    """Remove one application (and nothing else); returns whether it existed."""
    found = []

    def drop(config: dict, details: dict) -> None:
        found.append(app in (details.get("applications") or {}))
        config["applications"] = [a for a in config["applications"] if a["name"] != app]

    if app not in (rest.details().get("applications") or {}):
        return False
    with rest.changing(app, "delete"):
        rest.mutate(drop)
        deadline = time.monotonic() + wait_s
        while app in (rest.details().get("applications") or {}) and time.monotonic() < deadline:
            time.sleep(0.5)
    return found[0]


def delete_apps(rest: ServeREST, owned: Callable[[str], bool], *, wait_s: float = 60.0) -> list[str]:
    """Remove the declarative applications whose names ``owned`` accepts, one at a time; returns their names.
    Serve itself and every other application keep running (a shared cluster stays shared)."""
    names = [n for n, a in sorted((rest.details().get("applications") or {}).items())
             if owned(n) and a.get("source", "declarative") != "imperative"]
    return [n for n in names if delete_app(rest, n, wait_s=wait_s)]


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
    uc = target_user_config(details, app, "Ingress")
    if "rollout" not in uc:
        raise NotFound("rollout state of application", app, "is it a completions app?")
    return RolloutState.model_validate(uc["rollout"])


def canary(rest: ServeREST, app: str, *, model_name: str, version: str, percent: float, registry) -> RolloutState:
    """Load ``version`` into the Canary deployment (after checking its digest here), then send it ``percent``%."""
    mv = registry.verify(registry.get(model_name, version))  # refuse a tampered artifact before touching Serve
    with rest.changing(app, "canary"):
        before = rollout_state(rest, app)
        state = before.canary(mv.version, percent)
        # First load the weights (traffic still 0% there), then shift traffic: no request meets a half-loaded
        # canary.
        update_deployments(rest, app, {"Canary": {"model_version": mv.version}})
        _check_loaded(rest, app, "Canary", mv.version)
        update_deployments(rest, app, {"Ingress": {"rollout": state.model_dump()}},
                           expect={"Ingress": {"rollout": before.model_dump()}})
    return state


def promote(rest: ServeREST, app: str, *, registry, model_name: str) -> RolloutState:
    """The canary version becomes the stable one of every SLO class; the canary share returns to 0."""
    with rest.changing(app, "promote"):
        before = rollout_state(rest, app)
        try:
            state = before.promote()
        except ValueError as err:
            raise ServeDeployError(str(err)) from None
        registry.verify(registry.get(model_name, state.stable_version))
        update_deployments(rest, app, {
            d: {"model_version": state.stable_version} for d in ("Interactive", "Batch")
        })
        for d in ("Interactive", "Batch"):
            _check_loaded(rest, app, d, state.stable_version)
        update_deployments(rest, app, {"Ingress": {"rollout": state.model_dump()}},
                           expect={"Ingress": {"rollout": before.model_dump()}})
    return state


def rollback(rest: ServeREST, app: str) -> RolloutState:
    """All traffic back to the stable version (the canary deployment keeps its weights, idle)."""
    with rest.changing(app, "rollback"):
        before = rollout_state(rest, app)
        state = before.rollback()
        update_deployments(rest, app, {"Ingress": {"rollout": state.model_dump()}},
                           expect={"Ingress": {"rollout": before.model_dump()}})
    return state


def flush_caches(rest: ServeREST, app: str, tenant: str | None) -> str:
    """Ask every ingress replica of ``app`` to forget ``tenant``'s cached answers (all tenants' when ``None``).

    A fresh token under ``cache_flush`` in the ingress's ``user_config``: Serve applies it to each replica in
    place (:func:`aifactory.serve.cache.flush_requests`). Returns the token."""
    import uuid

    token = uuid.uuid4().hex[:12]

    def add_token(config: dict, details: dict) -> None:
        if "Ingress" not in (((details.get("applications") or {}).get(app) or {}).get("deployments") or {}):
            raise NotFound("cache of Serve application", app)
        live = target_user_config(details, app, "Ingress")
        flushes = {**(live.get("cache_flush") or {}), tenant or "*": token}
        for entry in config["applications"]:
            if entry["name"] == app:
                overrides = {d["name"]: d for d in entry.get("deployments") or []}
                overrides.setdefault("Ingress", {"name": "Ingress"})["user_config"] = {**live, "cache_flush": flushes}
                entry["deployments"] = list(overrides.values())
                return
        raise NotFound("cache of Serve application", app)

    rest.mutate(add_token)  # the writer's lock only: a flush takes effect beside a change in progress
    time.sleep(0.5)
    wait_running(rest, app, wait_s=120.0)
    return token


def _check_loaded(rest: ServeREST, app: str, deployment: str, version: str, *, wait_s: float = 60.0) -> None:
    """Ask the ingress (through a Serve handle: its HTTP status page needs a tenant's key) which version
    ``deployment`` holds; raise if the load was refused. Needs this process connected to the cluster."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        raise ServeDeployError("checking a rollout step needs a Ray driver of the cluster (aifactory.cluster.connect"
                               ".init_ray)")
    deadline = time.monotonic() + wait_s
    info: dict = {}
    while time.monotonic() < deadline:
        try:
            infos = serve.get_app_handle(app).deployment_infos.remote().result(timeout_s=15)
            info = infos.get(deployment, {})
        except Exception:  # noqa: BLE001 - a replica in the middle of reconfiguring; asked again below
            info = {}
        if info.get("version") == version:
            return
        if info.get("last_error") and version in info["last_error"]:
            raise ServeDeployError(f"{deployment} refused {version}: {info['last_error']}")
        time.sleep(0.5)
    raise ServeDeployError(f"{deployment} did not load {version} within {wait_s:.0f}s (it reports {info})")
