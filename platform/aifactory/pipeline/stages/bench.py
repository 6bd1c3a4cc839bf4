"""The ``bench`` stage of ``factory run``: the ``smoke`` sweep (Tune trials, 3 repeats), stored and reported.

Runs on the pipeline's cluster, tagged with the run's tenant; records the dataset and model versions that
earlier stages produced as context. Prints the report and hands its location on as ``bench_run``.
"""

from __future__ import annotations

from aifactory.pipeline.runner import RunContext, StageResult

SPEC = "smoke"


def bench_stage(ctx: RunContext) -> StageResult:
    from aifactory.bench.report import write_report
    from aifactory.bench.results import ResultStore
    from aifactory.bench.runner import run_sweep
    from aifactory.bench.spec import find_spec

    spec = find_spec(SPEC)
    model_version = ctx.artifacts.get("model_version")
    if model_version and ctx.artifacts.get("model_name"):
        model_version = f"{ctx.artifacts['model_name']}:{model_version}"
    outcome = run_sweep(spec, home=ctx.home, tenant=ctx.tenant, dataset_version=ctx.artifacts.get("dataset_version"),
                        model_version=model_version, log=ctx.log)
    report = write_report(outcome.run, outcome.trials, ResultStore(ctx.home).report_dir(outcome.run.run_id))
    # The summary's bench table has the figures; the whole Markdown report (~45 lines) is a file, and the
    # run's log (stdout, under factory run's RunLog).
    print(report.text, flush=True)
    ctx.log(f"  bench: report {report.markdown_path}")
    ctx.artifacts["bench_run"] = outcome.run.run_id
    rec = report.recommendation
    table = []
    for s in report.summaries:
        thr, p99 = s.metrics["throughput_rps"], s.metrics["p99_ms"]
        cost = s.metrics["cost_per_1k_requests_usd"]
        table.append({
            "config": s.config_id, "ok": f"{s.num_ok}/{s.num_ok + s.num_failed}",
            "req_per_s": _ci(thr), "p99_ms": _ci(p99),
            "usd_per_1k_req": f"{cost.median:.2e}" if cost.median is not None else "unavailable",
            "pareto": "yes" if s.config_id in report.pareto else "",
        })
    ok = outcome.run.num_failed == 0
    return StageResult(
        ok=ok,
        summary={"run": outcome.run.run_id, "trials": f"{outcome.run.num_trials - outcome.run.num_failed}/"
                 f"{outcome.run.num_trials}", "recommended": rec.config_id or "none",
                 "report": str(report.markdown_path), "_table": table},
        note="" if ok else f"({outcome.run.num_failed} trial(s) failed; see {outcome.location})",
    )


def _ci(s) -> str:
    if s.median is None:
        return "unavailable"
    return f"{s.median:.1f} [{s.ci_low:.1f}, {s.ci_high:.1f}]" if s.ci_low is not None else f"{s.median:.1f}"
