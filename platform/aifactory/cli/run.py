"""``factory run``: the whole factory end to end on an embedded (or given) Ray cluster.

The terminal gets progress lines, the summary, the path to the full log and, last, the path to the HTML
report; everything else (Ray's worker output, tracebacks, warnings) goes to the log file beside the report
(``<home>/factory-runs/<stamp>/``).
"""

from __future__ import annotations

import argparse
import os
import time

from aifactory.cli._common import add_address, add_tenant, home_of, tenant_of
from aifactory.cli._output import table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole factory end to end, stage by stage")
    add_tenant(p, required=False)
    add_address(p)
    p.add_argument("--only", action="append", help="run only this stage (repeatable)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the embedded cluster (default: max(4, cores))")
    p.set_defaults(func=_run, tenant="demo")


def _run(args: argparse.Namespace) -> int:
    from aifactory.cluster.connect import resolve_address
    from aifactory.pipeline.runner import RunLog
    from aifactory.pipeline.stages import default_stages

    home = home_of(args).ensure()
    tenant = tenant_of(args)
    stages = default_stages()
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in stages})
        if unknown:
            from aifactory.exceptions import FactoryError

            raise FactoryError(f"unknown stage(s) {unknown}; stages are {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in args.only]
    address = resolve_address(home, args.address)
    out_dir = home.root / "factory-runs" / time.strftime("%Y%m%d-%H%M%S")
    with RunLog(out_dir / "factory-run.log") as run_log:
        outcomes, report = _run_logged(args, home, tenant, stages, address, out_dir, run_log)
        run_log.say(f"\nfull log: {run_log.path}")
        run_log.say(f"report: {report}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def _run_logged(args, home, tenant, stages, address, out_dir, run_log):
    import ray

    from aifactory.cluster.connect import init_ray
    from aifactory.pipeline import RunContext, run_pipeline
    from aifactory.pipeline.report import collect, write_report
    from aifactory.provenance import code_version
    from aifactory.tenancy import WorkloadKind, job_metadata

    say = run_log.say
    code = code_version()
    t0 = time.monotonic()
    say(f"factory run: tenant {tenant}, home {home.root}, code {code}")
    say("starting an embedded Ray cluster ..." if address is None else f"connecting to {address.dashboard_url} ...")
    meta = job_metadata(tenant, workload=WorkloadKind.OTHER, code_version=code.sha, code_dirty=code.dirty,
                        extra={"entrypoint": "factory run"})
    # Ray Data's per-operator progress bars are noise in a log and bury the stage lines: the stages report progress.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"]}}
    resolved = init_ray(home, address=address, job_metadata=meta, num_cpus=args.num_cpus, runtime_env=runtime_env)
    say(f"cluster ready in {time.monotonic() - t0:.1f}s: dashboard {resolved.dashboard_url}")
    ctx = RunContext(home=home, tenant=tenant, address=resolved, embedded=address is None, log=say)
    try:
        outcomes = run_pipeline(stages, ctx)
    finally:
        ray.shutdown()
    say("\nsummary")
    table(
        [
            {
                "stage": o.stage.name,
                "status": o.status,
                "seconds": round(o.seconds, 1),
                "result": "; ".join(f"{k}={v}" for k, v in (o.result.summary if o.result else {}).items()
                           if not k.startswith("_"))
                or (o.error or ""),
            }
            for o in outcomes
        ],
        file=run_log,
    )
    for o in outcomes:
        extra = (o.result.summary.get("_table") if o.result else None)
        if extra:
            say(f"\n{o.stage.name}")
            table(extra, file=run_log)
    data = collect(outcomes, ctx, title=f"factory run {out_dir.name}",
                   facts={"tenant": str(tenant), "home": str(home.root), "code": str(code),
                          "cluster": resolved.dashboard_url, "log": str(run_log.path)})
    try:
        report = write_report(data, out_dir)
    except Exception as err:  # noqa: BLE001 - the run's figures are in the summary above; say why there is no report
        import traceback

        traceback.print_exc()  # to the log
        report = f"not written ({type(err).__name__}: {err}; traceback in the log)"
    return outcomes, report
