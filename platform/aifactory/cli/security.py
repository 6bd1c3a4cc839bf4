"""``factory keys create|list|rotate|revoke``, ``factory audit`` and ``factory control openapi``.

Keys and the audit log live under the factory home; these commands act on it directly (the operator's
access), while tenants use the control API with their keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aifactory.cli._common import home_of
from aifactory.cli._output import add_format, emit, emit_obj, results


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="per-tenant API keys of the control API (create, list, rotate, revoke)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    p = ksub.add_parser("create", help="issue a key for a tenant (or --admin); prints the secret once")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="the tenant the key acts for")
    who.add_argument("--admin", action="store_true", help="an admin key: sees and acts on every tenant")
    p.add_argument("--name", default="default", help="a label, e.g. the service or person using it")
    add_format(p)
    p.set_defaults(func=_create)

    p = ksub.add_parser("list", help="keys with their tenant, role and state (never their secrets)")
    p.add_argument("--tenant", help="only this tenant's keys")
    p.add_argument("--active", action="store_true", help="hide revoked and rotated keys")
    add_format(p)
    p.set_defaults(func=_list)

    p = ksub.add_parser("rotate", help="issue a replacement key and revoke the old one")
    p.add_argument("key_id")
    p.add_argument("--grace-s", type=float, default=0.0, help="seconds the old key keeps working (default 0)")
    add_format(p)
    p.set_defaults(func=_rotate)

    p = ksub.add_parser("revoke", help="revoke a key now")
    p.add_argument("key_id")
    add_format(p)
    p.set_defaults(func=_revoke)

    p = sub.add_parser("audit", help="the append-only audit log: who did what, when")
    p.add_argument("--tenant", help="only entries of this tenant")
    p.add_argument("--since", help="only entries since WHEN: 2h, 30m, 7d, an ISO date/time or epoch seconds")
    p.add_argument("--action", help="only this action or action group (e.g. job, job.submit, key)")
    p.add_argument("--limit", type=int, help="only the newest N entries")
    p.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 if it was tampered with")
    add_format(p)
    p.set_defaults(func=_audit)

    p = sub.add_parser("control", help="the factory control API (OpenAPI spec)")
    csub = p.add_subparsers(dest="control_command", metavar="ACTION", required=True)
    p = csub.add_parser("openapi", help="write the control API's OpenAPI spec (JSON)")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=_openapi)


def _store(args):
    from aifactory.security.apikeys import KeyStore

    return KeyStore(home_of(args))


def _issued(issued, fmt: str) -> None:
    out = {**issued.info.to_dict(), "key": issued.secret}
    emit_obj(out, fmt)
    if fmt == "table":
        print("\nstore the key now: it is not shown again (send it as `Authorization: Bearer <key>`)",
              file=sys.stderr)


def _create(args) -> int:
    issued = _store(args).create(tenant=args.tenant, role="admin" if args.admin else "tenant", name=args.name)
    _issued(issued, args.format)
    return 0


def _list(args) -> int:
    keys = _store(args).list(args.tenant, include_revoked=not args.active)
    rows = [k.to_dict() for k in keys]
    emit(rows, args.format, ["key_id", "tenant", "role", "name", "active", "created_by", "rotated_to"])
    return 0


def _rotate(args) -> int:
    _issued(_store(args).rotate(args.key_id, grace_s=args.grace_s), args.format)
    return 0


def _revoke(args) -> int:
    emit_obj(_store(args).revoke(args.key_id).to_dict(), args.format)
    return 0


def _audit(args) -> int:
    from aifactory import audit
    from aifactory.cli import _remote

    if _remote.via_api(args):  # a tenant's setup: the control API shows only the tenant's own entries
        return _remote.audit(args)
    home = home_of(args)
    if args.verify:
        n = audit.verify(home)  # raises IntegrityError (exit 1, one line) on tampering
        print(f"audit log intact: {n} entries, hash chain verified", file=sys.stderr)
    since = audit.parse_since(args.since) if args.since else None
    entries = audit.query(home, tenant=args.tenant, since=since, action=args.action, limit=args.limit)
    if args.format == "json":
        print(json.dumps([{**e.model_dump(), "time": e.time_iso} for e in entries], indent=2), file=results())
        return 0
    rows = [{"seq": e.seq, "time": e.time_iso, "actor": e.actor, "action": e.action, "target": e.target,
             "tenant": e.tenant, "detail": json.dumps(e.detail, sort_keys=True)[:60]} for e in entries]
    emit(rows, "table")
    return 0


def _openapi(args) -> int:
    from aifactory.control.app import openapi_spec

    text = json.dumps(openapi_spec(), indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
