"""``factory serve deploy|status|shutdown|canary|promote|rollback``: the serving apps on the cluster.

Every change is a declarative update through the dashboard's Serve REST API; canary, promote and rollback
change only ``user_config``, so replicas are reconfigured in place, never restarted. With the control API
configured (``AIFACTORY_API_URL``/``AIFACTORY_API_KEY``, a tenant's setup) the verbs go through it instead
(:mod:`aifactory.cli._remote`).
"""

from __future__ import annotations

import argparse
import contextlib

from aifactory.cli import _remote
from aifactory.cli._common import add_address, add_tenant, home_of, tenant_of
from aifactory.cli._output import add_format, emit, emit_obj, progress
from aifactory.tenancy import PLATFORM_TENANT, TenantRef


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="deploy and roll out the serving apps (completions, embeddings)")
    verbs = p.add_subparsers(dest="serve_command", metavar="VERB", required=True)

    d = verbs.add_parser("deploy", help="deploy (or update) an app through Serve's declarative API")
    d.add_argument("app", nargs="?", choices=("completions", "embeddings"), default="completions")
    d.add_argument("--model", help="registered model name (completions; default: the only/newest one)")
    d.add_argument("--version", help="model version (default: the newest servable)")
    d.add_argument("--config", help="a YAML/JSON file of the app's args (CompletionsArgs / EmbeddingsArgs)")
    d.add_argument("--name", help="application name (default: the app)")
    d.add_argument("--port", type=int, default=8000, help="HTTP port if Serve is not running yet (127.0.0.1)")
    add_tenant(d, required=False)
    add_address(d)
    add_format(d)
    d.set_defaults(func=_deploy)

    s = verbs.add_parser("status", help="applications, deployments, replicas and served versions")
    add_address(s)
    add_format(s)
    s.set_defaults(func=_status)

    x = verbs.add_parser("shutdown", help="remove an application (or all the operators' ones with --all)")
    x.add_argument("app", nargs="?", default="completions")
    x.add_argument("--all", action="store_true",
                   help="remove every operators' application (tenants' apps, the control API and Serve stay)")
    add_address(x)
    x.set_defaults(func=_shutdown)

    c = verbs.add_parser("canary", help="send PERCENT%% of traffic to VERSION (after checking its digest)")
    c.add_argument("version")
    c.add_argument("--percent", type=float, required=True, help="share of traffic, 0-100")
    c.add_argument("--app", default="completions")
    add_address(c)
    add_format(c)
    c.set_defaults(func=_canary)

    for verb, fn, text in (("promote", _promote, "make the canary version the stable one"),
                           ("rollback", _rollback, "send all traffic back to the stable version")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("--app", default="completions")
        add_address(v)
        add_format(v)
        v.set_defaults(func=fn)

    k = verbs.add_parser("cache", help="an app's cached answers (entries, hit ratio); --flush forgets them")
    k.add_argument("app", nargs="?", default="completions")
    k.add_argument("--tenant", help="only this tenant's entries (a tenant's key: always its own)")
    k.add_argument("--flush", action="store_true", help="forget the cached answers on every ingress replica")
    add_address(k)
    add_format(k)
    k.set_defaults(func=_cache)


def _rest(args):
    home, _, rest = _cluster(args)
    return home, rest


def _cluster(args):
    """(home, cluster address, Serve REST client) of the cluster this command acts on."""
    from aifactory.cluster.connect import auth_headers, ray_env, resolve_address
    from aifactory.exceptions import ClusterUnreachable
    from aifactory.serve.deploy import ServeREST

    home = home_of(args)
    address = resolve_address(home, args.address)
    if address is None:
        raise ClusterUnreachable("127.0.0.1:8265", "no `factory up` cluster and no --address")
    return home, address, ServeREST(address.dashboard_url, auth_headers(ray_env(home)),
                                    lock_dir=home.root / "serve" / "locks")


def _deploy(args) -> int:
    from aifactory.config import load_config
    from aifactory.serve import deploy
    from aifactory.serve.config import CompletionsArgs, EmbeddingsArgs

    if _remote.via_api(args):
        return _remote.serve_deploy(args)
    home = home_of(args)
    tenant = tenant_of(args)
    if args.app == "completions":
        overrides = {"model_name": args.model or _default_model(home), "model_version": args.version,
                     "home": str(home.root)}
        app_args = (load_config(CompletionsArgs, args.config, overrides=overrides) if args.config
                    else CompletionsArgs(**{k: v for k, v in overrides.items() if v is not None}))
        app_args = deploy.fit_to_registry(home, app_args)  # here, not in Serve's build task: nothing starts on bad args
        entry = deploy.completions_entry(app_args, name=args.name or "completions",
                                         route_prefix=f"/{args.name or 'completions'}")
    else:
        app_args = load_config(EmbeddingsArgs, args.config) if args.config else EmbeddingsArgs()
        entry = deploy.embeddings_entry(app_args, name=args.name or "embeddings",
                                        route_prefix=f"/{args.name or 'embeddings'}")
    _, rest = _rest(args)  # the cluster only once the args are known to fit
    progress(f"deploying {entry['name']} ({entry['import_path']}) ...")
    # An operator's app without --tenant is the platform's own: launched, recorded and metered like any.
    app = deploy.launch_app(rest, entry, app_args, home=home, tenant=tenant or TenantRef(tenant=PLATFORM_TENANT),
                            http_port=args.port)
    _audit(home, "serve.deploy", entry["name"], tenant, {"import_path": entry["import_path"],
                                                         "model": entry["args"].get("model_name")})
    emit(deploy.status(rest), args.format)
    return 0 if app.get("status") == "RUNNING" else 1


def _default_model(home) -> str:
    from aifactory.exceptions import ConfigError
    from aifactory.registry import ModelRegistry

    names = sorted({mv.name for mv in ModelRegistry(home).list()})
    if len(names) != 1:
        raise ConfigError("factory serve deploy", [f"--model: pick one of {names or 'the registered models (none yet)'}"])
    return names[0]


def _status(args) -> int:
    from aifactory.serve import deploy

    if _remote.via_api(args):
        return _remote.serve_status(args)
    _, rest = _rest(args)
    emit(deploy.status(rest), args.format)
    return 0


def _shutdown(args) -> int:
    from aifactory.serve import deploy

    if _remote.via_api(args):
        return _remote.serve_shutdown(args)
    _, rest = _rest(args)
    if args.all:
        # A shared cluster stays shared: tenants' apps (<tenant>.<name>) and imperative ones keep running.
        gone = deploy.delete_apps(rest, lambda name: "." not in name)
        progress(f"deleted {len(gone)} operators' Serve application(s): {', '.join(gone) or 'none'}")
        return 0
    found = deploy.delete_app(rest, args.app)
    progress(f"{args.app}: {'deleted' if found else 'not deployed'}")
    return 0


def _model_of(rest, app: str) -> str:
    from aifactory.exceptions import NotFound

    app_d = (rest.details().get("applications") or {}).get(app) or {}
    name = ((app_d.get("deployed_app_config") or {}).get("args") or {}).get("model_name")
    if not name:
        raise NotFound("declaratively deployed completions application", app, "deploy it with `factory serve deploy`")
    return name


@contextlib.contextmanager
def _driver(home, address):
    """This process as a Ray driver of the cluster for the duration of one command."""
    import ray

    from aifactory.cluster.connect import init_ray

    init_ray(home, address=address, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def _canary(args) -> int:
    from aifactory.registry import ModelRegistry
    from aifactory.serve import deploy

    if _remote.via_api(args):
        return _remote.serve_rollout(args, "canary")
    home, address, rest = _cluster(args)
    with _driver(home, address):  # the rollout step asks the ingress through a Serve handle
        state = deploy.canary(rest, args.app, model_name=_model_of(rest, args.app), version=args.version,
                              percent=args.percent, registry=ModelRegistry(home))
    _audit(home, "serve.canary", args.app, None, {"version": args.version, "percent": args.percent})
    emit_obj(state.model_dump(), args.format)
    return 0


def _promote(args) -> int:
    from aifactory.registry import ModelRegistry
    from aifactory.serve import deploy

    if _remote.via_api(args):
        return _remote.serve_rollout(args, "promote")
    home, address, rest = _cluster(args)
    with _driver(home, address):  # the rollout step asks the ingress through a Serve handle
        state = deploy.promote(rest, args.app, registry=ModelRegistry(home), model_name=_model_of(rest, args.app))
    _audit(home, "serve.promote", args.app, None, {"stable_version": state.stable_version})
    emit_obj(state.model_dump(), args.format)
    return 0


def _rollback(args) -> int:
    from aifactory.serve import deploy

    if _remote.via_api(args):
        return _remote.serve_rollout(args, "rollback")
    home, rest = _rest(args)
    state = deploy.rollback(rest, args.app)
    _audit(home, "serve.rollback", args.app, None, {"stable_version": state.stable_version})
    emit_obj(state.model_dump(), args.format)
    return 0


def _cache(args) -> int:
    """The operator's path: flush through a user_config update; read one ingress replica through a handle."""
    from aifactory.cluster.connect import init_ray
    from aifactory.serve import deploy

    if _remote.via_api(args):
        return _remote.serve_cache(args)
    home, address, rest = _cluster(args)
    if args.flush:
        token = deploy.flush_caches(rest, args.app, args.tenant)
        _audit(home, "serve.cache_flush", args.app, args.tenant, {"token": token, "scope": args.tenant or "*"})
        progress(f"{args.app}: cached answers of {args.tenant or 'every tenant'} flushed on every replica")
    import ray
    from ray import serve

    init_ray(home, address=address, logging_level="ERROR")
    try:
        info = serve.get_app_handle(args.app).cache_info.remote(args.tenant).result(timeout_s=60)
    finally:
        ray.shutdown()
    emit_obj({"app": args.app, "tenant": args.tenant, **info}, args.format)
    return 0


def _audit(home, action: str, app: str, tenant, detail: dict) -> None:
    """One audit entry per serving change made from the CLI (the control API records its own)."""
    from aifactory import audit
    from aifactory.provenance import whoami

    audit.record(home, actor=whoami(), action=action, target=app,
                 tenant=getattr(tenant, "tenant", tenant), detail=detail)
