"""``factory run``: the whole factory end to end on an embedded (or given) Ray cluster."""

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
    import ray

    from aifactory.cluster.connect import init_ray, resolve_address
    from aifactory.pipeline import RunContext, run_pipeline
    from aifactory.pipeline.stages import default_stages
    from aifactory.provenance import code_version
    from aifactory.tenancy import WorkloadKind, job_metadata

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
    code = code_version()
    t0 = time.monotonic()
    print(f"factory run: tenant {tenant}, home {home.root}, code {code}", flush=True)
    print("starting an embedded Ray cluster ..." if address is None else f"connecting to {address.dashboard_url} ...", flush=True)
    meta = job_metadata(tenant, workload=WorkloadKind.OTHER, code_version=code.sha, code_dirty=code.dirty,
                        extra={"entrypoint": "factory run"})
    # Ray Data's per-operator progress bars are noise in a log and bury the stage lines: the stages report progress.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"]}}
    resolved = init_ray(home, address=address, job_metadata=meta, num_cpus=args.num_cpus, runtime_env=runtime_env)
    print(f"cluster ready in {time.monotonic() - t0:.1f}s: dashboard {resolved.dashboard_url}", flush=True)
    try:
        ctx = RunContext(home=home, tenant=tenant, address=resolved, embedded=address is None)
        outcomes = run_pipeline(stages, ctx)
    finally:
        ray.shutdown()
    print("\nsummary")
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
        ]
    )
    for o in outcomes:
        extra = (o.result.summary.get("_table") if o.result else None)
        if extra:
            print(f"\n{o.stage.name}")
            table(extra)
    return 0 if all(o.status == "ok" for o in outcomes) else 1
