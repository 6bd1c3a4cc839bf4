"""The CLI through the factory control API, for tenants: ``AIFACTORY_API_URL`` + ``AIFACTORY_API_KEY`` set.

A tenant does not hold the cluster token, so where the control API is configured (and no ``--address``
asks for a cluster directly) these commands go through it, with the same arguments and output as the
operator's direct path: ``factory serve deploy|status|shutdown|canary|promote|rollback|cache``,
``factory costs`` (and ``costs budgets``) and ``factory audit``. The server applies tenant scoping, quotas,
budgets and the audit log; the CLI adds nothing it could skip. (``factory submit|jobs|logs|stop`` do the
same in ``cli/jobs.py``.)
"""

from __future__ import annotations

import argparse
import json

from aifactory.cli._output import emit, emit_obj, progress, results
from aifactory.exceptions import ConfigError


def via_api(args: argparse.Namespace) -> bool:
    """Whether this command goes through the control API (configured, and no ``--address`` overrides it)."""
    from aifactory.control.client import configured

    return configured() and not getattr(args, "address", None)


def _client():
    from aifactory.control.client import ControlClient

    return ControlClient.from_env()


def _flatten(app: dict) -> dict:
    rollout = app.get("rollout") or {}
    return {"app": app["name"], "tenant": app.get("tenant"), "route_prefix": app.get("route_prefix"),
            "status": app.get("status"), "stable": rollout.get("stable_version"),
            "canary": rollout.get("canary_version"), "canary_percent": rollout.get("canary_percent")}


# ---- serving ------------------------------------------------------------------------------------------

def serve_deploy(args: argparse.Namespace) -> int:
    if args.app != "completions" or args.config:
        raise ConfigError("factory serve deploy through the control API",
                          ["app: the control API deploys completions apps of your registered models, "
                           "without --config (the operators choose the serving configuration)"])
    if not args.model:
        raise ConfigError("factory serve deploy through the control API", ["--model: name your registered model"])
    tenant = args.tenant if getattr(args, "tenant", None) else None
    progress(f"deploying {args.name or 'completions'} through the control API ...")
    app = _client().serve_deploy(args.name or "completions", args.model, args.version, tenant=tenant)
    emit([_flatten(app)], args.format)
    return 0 if app.get("status") == "RUNNING" else 1


def serve_status(args: argparse.Namespace) -> int:
    emit([_flatten(a) for a in _client().serve_apps()], args.format)
    return 0


def serve_shutdown(args: argparse.Namespace) -> int:
    if args.all:
        raise ConfigError("factory serve shutdown through the control API", ["--all: name one of your apps"])
    _client().serve_delete(args.app)
    progress(f"{args.app}: deleted")
    return 0


def serve_rollout(args: argparse.Namespace, verb: str) -> int:
    client = _client()
    if verb == "canary":
        state = client.serve_canary(args.app, args.version, args.percent)
    elif verb == "promote":
        state = client.serve_promote(args.app)
    else:
        state = client.serve_rollback(args.app)
    emit_obj(state, args.format)
    return 0


def serve_cache(args: argparse.Namespace) -> int:
    client = _client()
    if args.flush:
        out = client.flush_cache(args.app, tenant=args.tenant)
        progress(f"{args.app}: cached answers of {out['tenant'] or 'every tenant'} flushed on every replica")
    emit_obj(client.cache_info(args.app, tenant=args.tenant), args.format)
    return 0


# ---- costs and audit ------------------------------------------------------------------------------------

def costs(args: argparse.Namespace) -> int:
    if getattr(args, "ledger", None) or getattr(args, "pricebook", None):
        raise ConfigError("factory costs through the control API",
                          ["--ledger/--pricebook: the control API prices from the cluster's own ledger"])
    from aifactory.cli.costs import emit_costs

    emit_costs(_client().costs(by=args.by, since=args.since, tenant=args.tenant), args.format)
    return 0


def budgets(args: argparse.Namespace) -> int:
    emit(_client().budgets(tenant=getattr(args, "tenant", None)), args.format)
    return 0


def audit(args: argparse.Namespace) -> int:
    if args.verify:
        raise ConfigError("factory audit through the control API",
                          ["--verify: checking the hash chain needs the home's key (an operator's command)"])
    entries = _client().audit(since=args.since, action=args.action, tenant=args.tenant)
    if args.limit:
        entries = entries[-args.limit:]
    if args.format == "json":
        print(json.dumps(entries, indent=2), file=results())
        return 0
    import datetime as dt

    def iso(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")

    rows = [{"seq": e.get("seq"), "time": iso(e["ts"]), "actor": e.get("actor"),
             "action": e.get("action"), "target": e.get("target"), "tenant": e.get("tenant"),
             "detail": json.dumps(e.get("detail"), sort_keys=True)[:60]} for e in entries]
    emit(rows, "table")
    return 0
