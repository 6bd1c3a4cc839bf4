"""The stages of ``factory run``, in order. Each capability adds its stage here."""

from __future__ import annotations

import sys

from aifactory.pipeline.runner import RunContext, Stage, StageResult
from aifactory.pipeline.stages.ingest import ingest_stage
from aifactory.pipeline.stages.train import train_stage
from aifactory.pipeline.stages.serve import serve_stage
from aifactory.pipeline.stages.bench import bench_stage
from aifactory.pipeline.stages.costs import costs_stage, metering_stage
from aifactory.tenancy import WorkloadKind


def smoke_job(ctx: RunContext) -> StageResult:
    """Submit a tiny job through the Job API, tagged with the tenant, and read its attribution back."""
    from aifactory.jobs import Client

    client = Client(address=ctx.address, tenant=ctx.tenant, home=ctx.home)
    job_id = client.submit(
        [sys.executable, "-c", "import ray; ray.init(); print('smoke ok', ray.cluster_resources().get('CPU'))"],
        workload=WorkloadKind.OTHER,
        num_cpus=0.25,
        entrypoint_num_cpus=0.25,
    )
    record = client.wait(job_id, timeout_s=120)
    attributed = any(r.id == job_id and r.tenant == ctx.tenant.tenant for r in client.list(tenant=ctx.tenant.tenant))
    ok = record.status == "SUCCEEDED" and attributed
    return StageResult(
        ok=ok,
        summary={
            "job": job_id,
            "status": record.status,
            "tenant": record.tenant,
            "seconds": round(record.duration_s or 0.0, 1),
        },
        note="" if ok else f"(status {record.status}, attributed={attributed}); job log tail:\n{_tail(client, job_id)}",
    )


def _tail(client, job_id: str, lines: int = 15) -> str:
    try:
        return "\n".join(client.logs(job_id).splitlines()[-lines:])
    except Exception as err:  # the log is a diagnostic only; the stage already failed
        return f"(no log: {err})"


def default_stages() -> list[Stage]:
    return [
        Stage("metering", "start the cost collector (Ray state API -> ledger)", metering_stage, expected_s=5),
        Stage("smoke-job", "a tenant-tagged job through Ray's Job API", smoke_job, expected_s=8),
        Stage("ingest", "stdlib source -> a versioned, contract-checked Parquet dataset", ingest_stage, expected_s=20),
        Stage("train", "FSDP2 + bf16 training to a validated, registered model", train_stage, expected_s=80),
        Stage("serve", "deploy the model on Ray Serve, a bounded burst: p50/p95/p99, cache hits", serve_stage,
              expected_s=40),
        Stage("bench", "the smoke sweep on Ray Tune: 2 serving configurations x 3 repeats, CIs, cost per 1k requests",
              bench_stage, expected_s=40),
        Stage("costs", "the per-tenant cost table of everything this run used, idle included", costs_stage,
              expected_s=10),
    ]
