"""``factory queue [--tenant T] [--lane L]`` and ``factory queue cancel ID``: the tenant job queue."""

from __future__ import annotations

import argparse

from aifactory.cli._common import home_of
from aifactory.cli._output import add_format, emit, emit_obj, human_duration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("queue", help="the job queue: position, priority, fair share, why it waits, ETA")
    p.add_argument("--tenant", help="only this tenant's entries")
    p.add_argument("--lane", help="only this lane's entries")
    p.add_argument("--finished-within", type=float, default=600.0, metavar="S",
                   help="also show entries that ended in the last S seconds (default 600)")
    add_format(p)
    p.set_defaults(func=_queue)
    qsub = p.add_subparsers(dest="queue_verb")
    c = qsub.add_parser("cancel", help="cancel a queued entry (a running one: `factory stop ID`)")
    c.add_argument("entry_id")
    add_format(c)
    c.set_defaults(func=_cancel)


def _queue(args: argparse.Namespace) -> int:
    from aifactory.queue.view import queue_rows

    rows = queue_rows(home_of(args), tenant=args.tenant, lane=args.lane, finished_within_s=args.finished_within)
    if args.format == "json":
        emit([r.model_dump() for r in rows], "json")
        return 0
    emit([{"id": r.id, "tenant": r.tenant, "lane": r.lane, "prio": r.priority, "state": r.state,
           "pos": r.position or "", "share": "" if r.share is None else f"{r.share:.2f}",
           "waited": human_duration(r.wait_s), "eta": "" if r.eta_s is None else human_duration(r.eta_s),
           "preempted": len(r.preemptions) or "", "why": (r.reason or "")[:70]} for r in rows], "table")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from aifactory.provenance import whoami
    from aifactory.queue.door import cancel

    entry = cancel(home_of(args), args.entry_id, actor=whoami())
    emit_obj({"id": entry.id, "state": entry.state}, args.format)
    return 0
