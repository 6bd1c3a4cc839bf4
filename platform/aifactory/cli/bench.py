"""``factory bench run | compare | report | list``: benchmark sweeps on Ray Tune, their records and reports."""

from __future__ import annotations

import argparse
import json
import time

from aifactory.cli._common import add_address, add_tenant, home_of, tenant_of
from aifactory.cli._output import add_format, emit, human_duration, progress, results
from aifactory.exceptions import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark sweeps (Ray Tune): run, compare, report, list")
    bsub = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)

    r = bsub.add_parser("run", help="run a sweep spec as Tune trials; store the records; write the report")
    r.add_argument("spec", help="a spec name (`factory bench list --specs`) or a YAML file")
    add_tenant(r, required=False)
    add_address(r)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set repeats=5 --set load.concurrency=32 (repeatable)")
    r.add_argument("--num-cpus", type=int, help="logical CPUs of an embedded cluster (when none is running)")
    r.add_argument("--no-report", action="store_true", help="store the records only")
    r.add_argument("--lane", help="the lane the sweep runs in (default: the tenant's in lanes.yaml, else factory)")
    r.set_defaults(func=_run)

    c = bsub.add_parser("compare", help="flag configurations whose median got worse (disjoint 95%% CIs)")
    c.add_argument("baseline", help="run id or run folder")
    c.add_argument("candidate", help="run id or run folder")
    c.add_argument("--threshold", type=float, default=0.05, help="relative change that counts (default 0.05 = 5%%)")
    c.add_argument("--metric", action="append", help="only this metric (repeatable; default: all)")
    c.add_argument("--all", action="store_true", help="show every metric, not only regressions and improvements")
    add_format(c, "table", "json")
    c.set_defaults(func=_compare)

    rp = bsub.add_parser("report", help="write a run's Markdown + PNG report (default: the newest run)")
    rp.add_argument("run", nargs="?", help="run id or run folder (default: newest)")
    rp.add_argument("--out", help="output folder (default: the run's report/ folder)")
    rp.add_argument("--slo-p99-ms", type=float, help="recommend for this p99 target instead of the spec's")
    rp.add_argument("--print", dest="print_md", action="store_true", help="print the Markdown")
    rp.set_defaults(func=_report)

    ls = bsub.add_parser("list", help="stored benchmark runs (or, with --specs, the sweep specs)")
    ls.add_argument("--specs", action="store_true", help="list the sweep specs that `bench run` knows by name")
    ls.add_argument("--tenant", help="only this tenant's runs")
    add_format(ls, "table", "json")
    ls.set_defaults(func=_list)


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. repeats=5")
            continue
        out[key.strip()] = yaml.safe_load(value)
    if problems:
        raise ConfigError("--set", problems)
    return out


def _run(args: argparse.Namespace) -> int:
    import ray

    from aifactory.bench.report import write_report
    from aifactory.bench.results import ResultStore
    from aifactory.bench.runner import run_sweep
    from aifactory.bench.spec import find_spec
    from aifactory.cluster.connect import init_ray, resolve_address
    from aifactory.config import config_hash
    from aifactory.provenance import code_version
    from aifactory.queue.door import resolve_lane
    from aifactory.tenancy import WorkloadKind, job_metadata

    home = home_of(args).ensure()
    spec = find_spec(args.spec, overrides=_parse_overrides(args.overrides))  # bad input starts nothing
    tenant = tenant_of(args) or spec.tenant
    spec = spec.model_copy(update={"tenant": tenant})
    code = code_version()
    meta = job_metadata(tenant, workload=WorkloadKind.BENCH, config_hash=config_hash(spec), code_version=code.sha,
                        code_dirty=code.dirty, extra={"entrypoint": "factory bench run", "bench_spec": spec.name})
    lane = resolve_lane(home, tenant.tenant, args.lane)  # before any cluster: a bad lane starts nothing
    address = resolve_address(home, args.address)
    progress("starting an embedded Ray cluster ..." if address is None else f"connecting to {address.dashboard_url} ...")
    init_ray(home, address=address, job_metadata=meta, num_cpus=args.num_cpus)
    try:
        outcome = run_sweep(spec, home=home, log=progress, lane=lane)
    finally:
        ray.shutdown()
    print(f"run {outcome.run.run_id}: {outcome.run.num_trials - outcome.run.num_failed}/{outcome.run.num_trials} "
          f"trials ok; records in {outcome.location}")
    if not args.no_report:
        report = write_report(outcome.run, outcome.trials, ResultStore(home).report_dir(outcome.run.run_id))
        _print_summary(report)
    return 0 if outcome.run.num_failed == 0 else 1


def _print_summary(report) -> None:
    family_serving = "throughput_rps" in (report.summaries[0].metrics if report.summaries else {})
    keys = (["throughput_rps", "p50_ms", "p99_ms", "cost_per_1k_requests_usd"] if family_serving
            else ["time_to_quality_s", "samples_per_s", "cost_per_validated_checkpoint_usd"])
    # The kinds that measure tokens (completions, the GPT trainer) show them too.
    extra = (["tokens_per_s", "cost_per_1m_tokens_usd"] if family_serving else ["tokens_per_s", "peak_memory_bytes"])
    keys += [k for k in extra if any(s.metrics.get(k) is not None and s.metrics[k].n for s in report.summaries)]
    rows = []
    for s in report.summaries:
        row = {"config": s.config_id, "ok": f"{s.num_ok}/{s.num_ok + s.num_failed}"}
        for k in keys:
            m = s.metrics.get(k)
            row[k] = None if m is None or m.median is None else (
                f"{m.median:.4g} [{m.ci_low:.4g}, {m.ci_high:.4g}]" if m.ci_low is not None else f"{m.median:.4g}")
        if not family_serving:
            row["ttq_mlperf_s"] = s.time_to_quality_mlperf_s
        rows.append(row)
    emit(rows, "table")
    rec = report.recommendation
    print(f"recommended: {rec.config_id} ({rec.reason})" if rec.config_id else f"recommended: none ({rec.reason})")
    print(f"report: {report.markdown_path}")


def _compare(args: argparse.Namespace) -> int:
    from aifactory.bench.compare import compare_runs
    from aifactory.bench.results import ResultStore

    store = ResultStore(home_of(args))
    result = compare_runs(store.get(args.baseline), store.get(args.candidate), threshold=args.threshold,
                          metrics=args.metric)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, default=str), file=results())
    else:
        shown = result.changes if args.all else result.regressions + result.improvements
        rows = [{"config": c.config_id, "metric": c.metric, "baseline": c.baseline_median,
                 "candidate": c.candidate_median, "change_%": round(c.change_pct, 1), "better": c.direction,
                 "verdict": c.verdict} for c in shown]
        print(f"baseline {result.baseline} vs candidate {result.candidate} (threshold {result.threshold:.0%}, "
              "regression = median worse beyond the threshold with disjoint 95% CIs)")
        emit(rows, "table")
        for c in result.regressions:
            print(f"REGRESSION {c.describe()}")
        if result.only_in_baseline or result.only_in_candidate:
            print(f"not compared: only in baseline {result.only_in_baseline}, only in candidate {result.only_in_candidate}")
        print(f"{len(result.regressions)} regression(s), {len(result.improvements)} improvement(s)")
    return 1 if result.regressions else 0


def _report(args: argparse.Namespace) -> int:
    from aifactory.bench.report import write_report
    from aifactory.bench.results import ResultStore

    store = ResultStore(home_of(args))
    run, trials = store.get(args.run)
    out = args.out or store.report_dir(run.run_id)
    report = write_report(run, trials, out, slo_p99_ms=args.slo_p99_ms)
    if args.print_md:
        print(report.text)
    _print_summary(report)
    for img in report.images:
        print(f"plot: {img}")
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.specs:
        from aifactory.bench.spec import available_specs, load_spec

        rows = []
        for name, path in available_specs().items():
            spec = load_spec(path)
            rows.append({"name": name, "kind": spec.kind.value, "configurations": len(spec.configurations()),
                         "repeats": spec.repeats, "file": str(path)})
        emit(rows, args.format)
        return 0
    from aifactory.bench.results import ResultStore

    runs = ResultStore(home_of(args)).list()
    if args.tenant:
        runs = [r for r in runs if r.tenant == args.tenant]
    if args.format == "json":
        emit([r.model_dump(exclude={"spec", "context"}) for r in runs], "json")
        return 0
    emit([{"run": r.run_id, "spec": r.spec_name, "kind": r.kind, "tenant": r.tenant,
           "trials": r.num_trials, "failed": r.num_failed, "age": human_duration(time.time() - r.started_at),
           "wall": human_duration(r.wall_s)} for r in runs], "table")
    return 0
