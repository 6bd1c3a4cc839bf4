"""``factory costs``: per-tenant costs from the ledger (no cluster needed), KPIs, budgets, quotas, exports."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from aifactory.cli._common import home_of
from aifactory.cli._output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("costs", help="per-tenant costs, KPIs, budgets and quotas (reads the ledger)")
    _common(p)
    p.add_argument("--by", default="tenant",
                   choices=["tenant", "project", "job", "deployment", "day", "resource", "pool"],
                   help="group rows by this (pool: the node pool, priced at its own rate)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    p.add_argument("--reprice-with", metavar="FILE",
                   help="what if: also price the rows as if price book FILE were added to the schedule (an undated "
                        "book prices all history); adds what_if_usd and delta_usd, writes nothing")
    p.set_defaults(func=_costs)
    cmds = p.add_subparsers(dest="costs_command", metavar="SUBCOMMAND")

    pn = cmds.add_parser("plan", help="commitment planner: the reservation for a pool that minimises total cost")
    _common(pn)
    pn.add_argument("--pool", required=True, help="node pool (aifactory.io/pool; 'default' for unlabelled nodes)")
    pn.add_argument("--resource", choices=("cpu", "gpu", "asic", "memory"), default="cpu")
    pn.add_argument("--sku", help="price-book SKU (default: cpu / gib; an accelerator type for gpu/asic)")
    pn.add_argument("--region", help="price-book region (default: the book's default_region)")
    pn.add_argument("--burst", choices=("on-demand", "spot"), default="on-demand",
                    help="what demand above the reservation is bought as (default: on-demand)")
    pn.add_argument("--bucket-s", type=float, default=3600.0,
                    help="demand is averaged per bucket of this many seconds (default: 3600, a reserved hour)")
    pn.add_argument("--out", help="PNG of demand vs the reserved line (default: <home>/reports/plan-<pool>-<resource>.png)")
    pn.add_argument("--format", choices=("table", "json", "csv"), default="table")
    pn.set_defaults(func=_plan)

    pb = cmds.add_parser("pricebook", help="the price books in force over time (list, add a dated book)")
    pbs = pb.add_subparsers(dest="pricebook_command", metavar="ACTION", required=True)
    pl = pbs.add_parser("list", help="each book of the schedule: version, in force from, until, file")
    pl.add_argument("--format", choices=("table", "json", "csv"), default="table")
    pl.set_defaults(func=_pricebook_list)
    pa = pbs.add_parser("add", help="add a price book that prices usage from its effective_from on (default: now)")
    pa.add_argument("file", help="price book YAML (its version must be new)")
    pa.add_argument("--effective-from", help="ISO date/time (UTC unless a zone is given); default: the book's "
                                             "effective_from, else now")
    pa.add_argument("--backdate", action="store_true",
                    help="allow an effective_from in the past (reprices usage already recorded)")
    pa.set_defaults(func=_pricebook_add)

    r = cmds.add_parser("report", help="write an HTML cost report with PNG charts")
    _common(r)
    r.add_argument("--out", help="output directory (default: <home>/reports/costs-<time>)")
    r.set_defaults(func=_report)

    k = cmds.add_parser("kpis", help="KPIs per tenant and project (cost per job, per 1k requests, ...)")
    _common(k)
    k.add_argument("--format", choices=("table", "json", "csv"), default="table")
    k.set_defaults(func=_kpis)

    b = cmds.add_parser("budgets", help="budgets: spend in the current period against soft/hard limits")
    b.add_argument("--format", choices=("table", "json", "csv"), default="table")
    b.set_defaults(func=_budgets)

    s = cmds.add_parser("set-budget", help="set a tenant's budget in <home>/budgets.yaml")
    s.add_argument("tenant")
    s.add_argument("--period", choices=("day", "week", "month"), default="month")
    s.add_argument("--soft-usd", type=float)
    s.add_argument("--hard-usd", type=float)
    s.set_defaults(func=_set_budget)

    q = cmds.add_parser("set-quota",
                        help="set a tenant's concurrent CPU/GPU quota (all pools, or --pool P) in <home>/budgets.yaml")
    q.add_argument("tenant")
    q.add_argument("--cpu", type=float)
    q.add_argument("--gpu", type=float)
    q.add_argument("--pool", help="limit within this node pool (aifactory.io/pool) only; default: all pools")
    q.set_defaults(func=_set_quota)

    e = cmds.add_parser("export", help="serve the Prometheus cost metrics on 127.0.0.1 until interrupted")
    e.add_argument("--port", type=int, default=9464)
    e.set_defaults(func=_export)

    d = cmds.add_parser("dashboard", help="write the Grafana dashboard (provisioning files); push if configured")
    d.add_argument("--out", help="directory (default: <home>/grafana)")
    d.add_argument("--push", action="store_true", help="push via grafana-client (AIFACTORY_GRAFANA_URL/_TOKEN)")
    d.set_defaults(func=_dashboard)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--since", help="from: a duration (2h, 7d), an ISO date or Unix seconds (default: all)")
    p.add_argument("--ledger", help="ledger file (default: <home>/ledger.sqlite)")
    p.add_argument("--pricebook", help="price book YAML (default: <home>/pricebook.yaml, else the packaged one)")


def _load(args):
    from aifactory.cost.kpis import parse_since
    from aifactory.cost.ledger import Ledger
    from aifactory.cost.schedule import load_prices

    home = home_of(args)
    ledger = Ledger(args.ledger) if getattr(args, "ledger", None) else Ledger.of(home)
    book = load_prices(getattr(args, "pricebook", None), home=home)
    since = parse_since(getattr(args, "since", None), now=time.time())
    return home, ledger, book, since


def _costs(args) -> int:
    from aifactory.cli import _remote
    from aifactory.cost.kpis import cost_rows

    if _remote.via_api(args):  # a tenant's setup: the control API prices its own ledger, scoped to the key
        return _remote.costs(args)
    _home, ledger, book, since = _load(args)
    records = ledger.usage(since=since, tenant=args.tenant)
    if args.reprice_with:
        from aifactory.config import read_yaml
        from aifactory.cost.kpis import reprice_rows
        from aifactory.cost.pricebook import parse_price_book

        what_if = book.with_book(parse_price_book(read_yaml(args.reprice_with), source=args.reprice_with),
                                 args.reprice_with)
        emit(reprice_rows(records, book, what_if, by=args.by), args.format)
        if args.format == "table":
            print(f"price books in force: {book.version}; what if: {what_if.version}")
        return 0
    rows = cost_rows(records, book, by=args.by)
    emit_costs(rows, args.format)
    if args.format == "table" and args.tenant is None and records:
        print(capacity_line(records))
    if args.format == "table":
        for a in ledger.alerts(since=since):
            if args.tenant is None or a["tenant"] == args.tenant:
                print(f"alert ({a['kind']}): tenant {a['tenant']}: {a['message']}")
    return 0


def _plan(args) -> int:
    import sys
    from pathlib import Path

    from aifactory.cost.planner import demand_series, plan, write_chart
    from aifactory.cost.records import PricingClass, Resource
    from aifactory.exceptions import ConfigError

    home, ledger, prices, since = _load(args)
    book = prices.at(time.time())  # a commitment is bought at today's rates
    sku = args.sku or {"cpu": "cpu", "memory": "gib"}.get(args.resource)
    if sku is None:
        raise ConfigError("factory costs plan", [f"--sku: required for --resource {args.resource} (e.g. H100)"])
    if not args.bucket_s > 0:
        raise ConfigError("factory costs plan", [f"--bucket-s: must be > 0 (got {args.bucket_s})"])
    rate = book.rate(Resource(args.resource), sku, args.region or book.default_region)
    demand = demand_series(ledger.usage(since=since, tenant=args.tenant), pool=args.pool, resource=args.resource,
                           bucket_s=args.bucket_s)
    if not demand.units:
        print(f"factory costs plan: the ledger {ledger.path} has no {args.resource} usage in pool {args.pool!r}"
              f"{' since ' + args.since if args.since else ''}; nothing to plan from", file=sys.stderr)
        return 1
    burst = PricingClass(args.burst)
    p = plan(demand, reserved_usd_per_hour=rate.usd_per_hour(PricingClass.RESERVED),
             on_demand_usd_per_hour=rate.usd_per_hour(burst))
    out = Path(args.out or home.root / "reports" / f"plan-{args.pool}-{args.resource}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    chart = write_chart(out, demand, p.reserved_units, title=f"pool {args.pool}: {args.resource} ({sku}), "
                        f"reserved vs {burst.value} burst, book {book.version}")
    row = {"pool": args.pool, "resource": args.resource, "sku": sku, "price_book": book.version,
           "burst": burst.value, **p.as_dict(), "chart": chart}
    if args.format != "table":
        emit([row], args.format)
        return 0
    print(f"pool {args.pool}, {args.resource} ({sku}), {p.hours:.2f} h of history, price book {book.version}: "
          f"reserved ${rate.usd_per_hour(PricingClass.RESERVED):g}/h vs {burst.value} ${rate.usd_per_hour(burst):g}/h")
    print(f"  reserve {p.reserved_units:.3f} units: covers the demand {p.covered_percentile:.1f}% of the time")
    print(f"  cost ${p.total_usd:.6f} vs all {burst.value} ${p.all_on_demand_usd:.6f}: saves ${p.savings_usd:.6f} "
          f"({p.savings_pct:.1f}%)")
    print(f"  if usage falls 20%: cost ${p.drop_20pct_usd:.6f} vs ${p.drop_20pct_best_usd:.6f} at the best "
          f"reservation for it (over-commitment ${p.over_commitment_usd:.6f}); still saves "
          f"${p.drop_20pct_savings_usd:.6f} vs all {burst.value}")
    print(f"  chart: {chart}")
    return 0


def _pricebook_list(args) -> int:
    from aifactory.cost.schedule import load_prices

    emit(load_prices(home=home_of(args)).rows(), args.format)
    return 0


def _pricebook_add(args) -> int:
    from aifactory import audit
    from aifactory.config import read_yaml
    from aifactory.cost.pricebook import parse_price_book
    from aifactory.cost.schedule import add_price_book
    from aifactory.provenance import whoami

    home = home_of(args)
    data = read_yaml(args.file)
    if args.effective_from:
        data = {**data, "effective_from": args.effective_from}
    book = parse_price_book(data, source=args.file)
    path = add_price_book(home, book, backdate=args.backdate)
    added = parse_price_book(read_yaml(path), source=str(path))
    audit.record(home, actor=whoami(), action="pricebook.add", target=added.version,
                 detail={"effective_from": added.effective_from.isoformat(), "path": str(path),
                         "backdate": bool(args.backdate)})
    print(f"{path}: price book {added.version} prices usage from {added.effective_from.isoformat()} on")
    return 0


def emit_costs(rows: list[dict], fmt: str) -> None:
    """Cost rows as a table (estimated figures marked "~", with a footnote) or as JSON/CSV (the fields)."""
    if fmt != "table":
        emit(rows, fmt)
        return
    from aifactory.cost.report import estimated_note, mark_estimated

    emit(mark_estimated(rows), fmt)
    if note := estimated_note(rows):
        print(note)


def capacity_line(records) -> str:
    """One line that shows the capacity invariant: every window's CPU-seconds (tenants + unattributed + idle)
    add up to the cluster's CPUs x the window, so the average CPUs held is the capacity."""
    from aifactory.cost.records import Resource

    windows = {(r.window_start, r.window_end) for r in records}
    seconds = sum(end - start for start, end in windows)
    cpu_s = sum(r.quantity_s for r in records if r.resource == Resource.CPU)
    return (f"capacity: {len(windows)} windows, {seconds:.0f} s; tenants + unattributed + idle = {cpu_s:.1f} CPU-s "
            f"= {cpu_s / seconds if seconds else 0:.2f} CPUs x time")


def _kpis(args) -> int:
    from aifactory.cost.kpis import kpis

    _home, ledger, book, since = _load(args)
    rows = kpis(ledger.usage(since=since, tenant=args.tenant), book,
                serve_usage=ledger.serve_usage(since=since, tenant=args.tenant),
                events=ledger.events(since=since, tenant=args.tenant))
    emit(rows, args.format)
    return 0


def _report(args) -> int:
    from aifactory.cost.report import write_report

    home, ledger, book, since = _load(args)
    out = args.out or str(home.root / "reports" / time.strftime("costs-%Y%m%d-%H%M%S"))
    path = write_report(out, ledger=ledger, book=book, since=since, tenant=args.tenant)
    print(path)
    return 0


def _budgets(args) -> int:
    from aifactory.cli import _remote

    if _remote.via_api(args):
        return _remote.budgets(args)
    from aifactory.cost.budgets import budget_status

    emit(budget_status(home_of(args)), args.format)
    return 0


def _edit_limits(args, section: str, edit: Callable[[dict], dict]) -> int:
    """Replace one tenant's ``section`` ("budget" | "quota") with ``edit(current section)``, validated, one read."""
    from aifactory.config import parse_config
    from aifactory.cost.budgets import BudgetsConfig, budgets_path, load_budgets, save_budgets

    home = home_of(args)
    data = load_budgets(home).model_dump(mode="json", exclude_none=True)
    entry = data.setdefault("tenants", {}).setdefault(args.tenant, {})
    entry[section] = {k: v for k, v in edit(entry.get(section) or {}).items() if v is not None}
    cfg = parse_config(BudgetsConfig, data, source=f"{section} of tenant {args.tenant}")
    save_budgets(home, cfg)
    from aifactory import audit
    from aifactory.provenance import whoami

    audit.record(home, actor=whoami(), action=f"{section}.set", target=args.tenant, tenant=args.tenant,
                 detail={"after": entry[section]})
    print(f"{budgets_path(home)}: {args.tenant} {section} = {entry[section]}")
    return 0


def _set_budget(args) -> int:
    return _edit_limits(args, "budget",
                        lambda _: {"period": args.period, "soft_usd": args.soft_usd, "hard_usd": args.hard_usd})


def _set_quota(args) -> int:
    limits = {"cpu": args.cpu, "gpu": args.gpu}

    def edit(quota: dict) -> dict:
        pools = quota.get("pools") or {}
        if args.pool:  # this pool's limits; the all-pools ones and other pools' stay
            pools[args.pool] = {k: v for k, v in limits.items() if v is not None}
            values = {"cpu": quota.get("cpu"), "gpu": quota.get("gpu")}
        else:  # the all-pools limits; the pools' stay
            values = limits
        return {**values, "pools": pools or None}

    return _edit_limits(args, "quota", edit)


def _export(args) -> int:
    from aifactory.cost.exporter import serve_exporter

    home = home_of(args)
    port = serve_exporter(home.ledger_path, port=args.port, home_root=home.root)
    print(f"serving cost metrics on http://127.0.0.1:{port}/metrics (Ctrl-C stops)", flush=True)
    while True:
        time.sleep(3600)


def _dashboard(args) -> int:
    from aifactory.cost.dashboards import push, write_provisioning

    home = home_of(args)
    path = write_provisioning(args.out or home.root / "grafana")
    print(path)
    if args.push:
        result = push()
        print("pushed" if result is not None else "not pushed: set AIFACTORY_GRAFANA_URL and AIFACTORY_GRAFANA_TOKEN")
    return 0
