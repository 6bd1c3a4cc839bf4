"""Serving through the control API: deploy, list, canary, promote, rollback (through ``aifactory.serve.deploy``).

A tenant's application is named ``<tenant>.<name>`` (a tenant name cannot contain a dot, so the owner is
unambiguous) and routed at ``/t/<tenant>/<name>``. A tenant acts only on its own applications and deploys
only models registered for it (``manifest.tenant``), verified (signature and sha256) before Serve sees
them; anything else answers 404. Applications outside this naming are the operators' (admins only).
Deploys go through the launch path (admission of the app's replicas x per-replica resources, the run
record, cost events); every change is audited once.

Response caches: a tenant reads and flushes only its own entries, in its own applications and in the
operators' shared ones (where its requests are cached too); an admin names a tenant or acts on all.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from aifactory import audit
from aifactory.config import StrictModel
from aifactory.control.app import CurrentPrincipal, not_visible, state_of
from aifactory.control.guard import check_name
from aifactory.exceptions import ClusterUnreachable, ConfigError, NotFound, PermissionDenied
from aifactory.security.apikeys import Principal
from aifactory.tenancy import Name, TenantName, TenantRef

router = APIRouter(tags=["serving"])

AppName = Annotated[str, Path(min_length=1, max_length=128, description="Application: <tenant>.<name>.")]


class ServeDeployBody(StrictModel):
    name: Name = Field(description="Application name within your tenant (a DNS label).")
    # Names are checked in the route (400 naming the field), not here (pydantic's 422).
    model_name: str = Field(description="A registered model of your tenant (lowercase, digits, '.', '_', '-'; "
                            "1-128 characters).")
    model_version: str | None = Field(default=None, description="Version (v<N>); null = newest servable.")
    tenant: TenantName | None = Field(default=None, description="Admins only: the tenant that owns the app.")


class CanaryBody(StrictModel):
    model_version: str = Field(description="The version to send canary traffic to (v<N>).")
    percent: float = Field(ge=0, le=100, description="Share of traffic for the canary.")


class ServeApp(BaseModel):
    name: str
    tenant: str | None
    route_prefix: str | None
    status: str | None
    rollout: dict | None = None


def owner_of(app: str) -> str | None:
    tenant, dot, _ = app.partition(".")
    return tenant if dot else None


def _rest(request: Request):
    from aifactory.cluster.connect import auth_headers, ray_env, resolve_address
    from aifactory.serve.deploy import ServeREST

    state = state_of(request)
    address = resolve_address(state.home, state.address)
    if address is None:
        raise ClusterUnreachable("(no address)", "the control API found no cluster")
    # Every replica of the control API, the CLI and `factory run` share the one writer's locks under the home.
    return ServeREST(address.dashboard_url, auth_headers(ray_env(state.home)),
                     lock_dir=state.home.root / "serve" / "locks")


def _visible_app(principal: Principal, app: str) -> str:
    check_name("app", app)  # 400 naming `app` before anything looks it up
    if not principal.can_see(owner_of(app)):
        raise not_visible("Serve application", app)
    return app


def _tenant_model(request: Request, tenant: str, model_name: str, version: str | None):
    """A verified model version registered for ``tenant`` (404 alike if absent or another tenant's)."""
    from aifactory.registry import ModelRegistry

    # The tenant's own namespace: another tenant's versions of the same name are not there to find.
    registry = ModelRegistry(state_of(request).home, tenant=tenant)
    try:
        mv = registry.get(model_name, version)
    except (NotFound, ConfigError):
        raise not_visible("model version", f"{model_name}:{version or 'latest'}") from None
    return registry, registry.verify(mv)  # IntegrityError (409) for a tampered manifest or weights


@router.get("/serve/apps", response_model=list[ServeApp], summary="Your tenant's Serve applications")
def list_apps(request: Request, principal: CurrentPrincipal) -> list[ServeApp]:
    apps = (_rest(request).details().get("applications") or {})
    out = []
    for name, app in sorted(apps.items()):
        if not principal.can_see(owner_of(name)):
            continue
        cfg = app.get("deployed_app_config") or {}
        ingress = ((app.get("deployments") or {}).get("Ingress") or {}).get("deployment_config") or {}
        out.append(ServeApp(name=name, tenant=owner_of(name), route_prefix=app.get("route_prefix")
                            or cfg.get("route_prefix"), status=app.get("status"),
                            rollout=(ingress.get("user_config") or {}).get("rollout")))
    return out


@router.post("/serve/apps", response_model=ServeApp, status_code=201, summary="Deploy a completions app")
def deploy_app(body: ServeDeployBody, request: Request, principal: CurrentPrincipal) -> ServeApp:
    from aifactory.serve.config import CompletionsArgs
    from aifactory.serve.deploy import completions_entry, fit_to_registry, launch_app

    if principal.is_admin:
        if body.tenant is None:
            raise ConfigError("serve deploy", ["tenant: an admin key must name the tenant that owns the app"])
        tenant = body.tenant
    elif body.tenant is not None and body.tenant != principal.tenant:
        raise PermissionDenied("tenant: your API key deploys only for its own tenant; omit `tenant`")
    else:
        tenant = principal.tenant
    home = state_of(request).home
    check_name("model_name", body.model_name)
    check_name("model_version", body.model_version)
    _, mv = _tenant_model(request, tenant, body.model_name, body.model_version)
    app, route = f"{tenant}.{body.name}", f"/t/{tenant}/{body.name}"
    # A tenant's app answers only that tenant's factory API keys: Serve's HTTP port is reachable without the
    # control API, so the app itself must not take an X-Tenant header's word or serve another tenant.
    args = CompletionsArgs.model_validate({**state_of(request).tenant_app_defaults, "model_name": mv.qualified_name,
                                           "model_version": mv.version, "home": str(home.root),
                                           "auth": "factory-keys", "tenants": [tenant]})
    args = fit_to_registry(home, args)  # a misfit is a 422 naming the limits, before Serve is touched
    status = launch_app(_rest(request), completions_entry(args, name=app, route_prefix=route), args, home=home,
                        tenant=TenantRef(tenant=tenant), actor=principal.actor)
    audit.record(home, actor=principal.actor, action="serve.deploy", target=app, tenant=tenant,
                 detail={"model": mv.ref, "sha256": mv.sha256, "route_prefix": route})
    return ServeApp(name=app, tenant=tenant, route_prefix=route, status=status.get("status"))


def _model_name(rest, app: str) -> str:
    details = (rest.details().get("applications") or {}).get(app)
    if not details:
        raise not_visible("Serve application", app)
    args = (details.get("deployed_app_config") or {}).get("args") or {}
    if "model_name" not in args:
        raise not_visible("rollout state of application", app)
    return args["model_name"]


@router.post("/serve/apps/{app}/canary", summary="Send a share of traffic to a new model version")
def canary(app: AppName, body: CanaryBody, request: Request, principal: CurrentPrincipal) -> dict:
    from aifactory.serve import deploy as sd

    _visible_app(principal, app)
    check_name("model_version", body.model_version)
    rest = _rest(request)
    model_name = _model_name(rest, app)
    if owner_of(app) is not None:  # a tenant's app takes only that tenant's verified models
        registry, _ = _tenant_model(request, owner_of(app), model_name, body.model_version)
    else:  # an operators' app (admins only); deploy.canary still verifies the version
        from aifactory.registry import ModelRegistry

        registry = ModelRegistry(state_of(request).home)
    state = sd.canary(rest, app, model_name=model_name, version=body.model_version, percent=body.percent,
                      registry=registry)
    audit.record(state_of(request).home, actor=principal.actor, action="serve.canary", target=app,
                 tenant=owner_of(app), detail={"version": body.model_version, "percent": body.percent})
    return state.model_dump()


@router.post("/serve/apps/{app}/promote", summary="Make the canary version the stable one")
def promote(app: AppName, request: Request, principal: CurrentPrincipal) -> dict:
    from aifactory.registry import ModelRegistry
    from aifactory.serve import deploy as sd

    _visible_app(principal, app)
    rest = _rest(request)
    state = sd.promote(rest, app, registry=ModelRegistry(state_of(request).home), model_name=_model_name(rest, app))
    audit.record(state_of(request).home, actor=principal.actor, action="serve.promote", target=app,
                 tenant=owner_of(app), detail={"stable_version": state.stable_version})
    return state.model_dump()


@router.post("/serve/apps/{app}/rollback", summary="All traffic back to the stable version")
def rollback(app: AppName, request: Request, principal: CurrentPrincipal) -> dict:
    from aifactory.serve import deploy as sd

    _visible_app(principal, app)
    rest = _rest(request)
    _model_name(rest, app)  # 404 for an app that does not exist
    state = sd.rollback(rest, app)
    audit.record(state_of(request).home, actor=principal.actor, action="serve.rollback", target=app,
                 tenant=owner_of(app), detail={"stable_version": state.stable_version})
    return state.model_dump()


@router.delete("/serve/apps/{app}", summary="Shut down one of your Serve applications")
def delete_app(app: AppName, request: Request, principal: CurrentPrincipal) -> dict:
    from aifactory.serve import deploy as sd

    _visible_app(principal, app)
    if not sd.delete_app(_rest(request), app):
        raise not_visible("Serve application", app)
    audit.record(state_of(request).home, actor=principal.actor, action="serve.delete", target=app,
                 tenant=owner_of(app))
    return {"name": app, "deleted": True}


class CacheInfo(BaseModel):
    app: str
    tenant: str | None = Field(description="Whose entries these are; null = every tenant's (admins).")
    exact: dict | None = Field(description="Exact-answer cache: entries, lookups, hits, hit_ratio (null = off).")
    semantic: dict | None = Field(description="Semantic cache: entries, lookups, hits, hit_ratio (null = off).")
    note: str = "from one ingress replica; Prometheus' aifactory_serve_cache_* metrics aggregate all replicas"


def _cache_scope(principal: Principal, app: str, tenant: str | None) -> str | None:
    """The tenant whose cache entries this call reads or flushes (``None``: all, admins only)."""
    owner = owner_of(app)
    if principal.is_admin:
        return tenant
    if tenant is not None and tenant != principal.tenant:
        raise not_visible("cache entries of tenant", tenant)
    if owner is not None and owner != principal.tenant:
        raise not_visible("Serve application", app)
    return principal.tenant


def _ingress_of(request: Request, app: str) -> None:
    apps = _rest(request).details().get("applications") or {}
    if "Ingress" not in ((apps.get(app) or {}).get("deployments") or {}):
        raise not_visible("cache of Serve application", app)


@router.get("/serve/apps/{app}/cache", response_model=CacheInfo, summary="Your cached answers in an application")
async def cache_info(app: AppName, request: Request, principal: CurrentPrincipal,
                     tenant: TenantName | None = None) -> CacheInfo:
    import asyncio

    from ray import serve

    check_name("app", app)
    scope = _cache_scope(principal, app, tenant)
    await asyncio.to_thread(_ingress_of, request, app)  # a blocking REST call: off the event loop
    info = await asyncio.wait_for(serve.get_app_handle(app).cache_info.remote(scope), timeout=30)
    return CacheInfo(app=app, tenant=scope, exact=info.get("exact"), semantic=info.get("semantic"))


@router.delete("/serve/apps/{app}/cache", summary="Forget your cached answers in an application (every replica)")
def flush_cache(app: AppName, request: Request, principal: CurrentPrincipal, tenant: TenantName | None = None) -> dict:
    from aifactory.serve import deploy as sd

    check_name("app", app)
    scope = _cache_scope(principal, app, tenant)
    token = sd.flush_caches(_rest(request), app, scope)  # NotFound (404) for an app without an ingress
    audit.record(state_of(request).home, actor=principal.actor, action="serve.cache_flush", target=app,
                 tenant=scope, detail={"token": token, "scope": scope or "*"})
    return {"app": app, "tenant": scope, "flushed": True, "token": token}
