"""``factory submit | jobs | logs | stop``: work on the cluster, tagged by tenant."""

from __future__ import annotations

import argparse
import asyncio
import sys

from aifactory.cli._common import add_address, add_tenant, home_of, parse_bytes, tenant_of
from aifactory.cli._output import add_format, emit, human_duration
from aifactory.exceptions import FactoryError
from aifactory.jobs import Client
from aifactory.tenancy import WorkloadKind


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a command as a Ray job tagged with a tenant",
        usage="factory submit --tenant T [options] -- ENTRYPOINT...",
    )
    add_tenant(p, required=True)
    add_address(p)
    p.add_argument("--working-dir", help="directory uploaded as the job's working dir")
    p.add_argument("--workload", choices=[w.value for w in WorkloadKind], default=WorkloadKind.OTHER.value)
    p.add_argument("--num-cpus", type=float,
                   help="CPUs the job will hold at once in all, its tasks and actors included (checked against "
                        "the tenant's quota)")
    p.add_argument("--num-gpus", type=float, help="GPUs the job will hold at once in all")
    p.add_argument("--entrypoint-num-cpus", type=float,
                   help="CPUs the driver process reserves, part of --num-cpus (as in `ray job submit`)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs the driver process reserves")
    p.add_argument("--lane", help="the lane to queue in (default: the tenant's in lanes.yaml, else factory)")
    p.add_argument("--priority", type=int, help="priority within the lane (default: the lane's default_priority)")
    p.add_argument("--memory", help="memory reserved for the entrypoint, e.g. 2GiB")
    p.add_argument("--submission-id", help="use this job id instead of a generated one")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 1 if it fails")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(func=_submit)

    p = sub.add_parser("jobs", help="list jobs with their tenant, project and status")
    p.add_argument("--tenant", help="only this tenant's jobs (use 'unattributed' for untagged ones)")
    add_address(p)
    add_format(p, "table", "json")
    p.set_defaults(func=_jobs)

    p = sub.add_parser("logs", help="print a submitted job's logs")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    add_address(p)
    p.set_defaults(func=_logs)

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job_id")
    add_address(p)
    p.set_defaults(func=_stop)


def _client(args: argparse.Namespace, *, tenant=None) -> Client:
    from aifactory.control.client import ControlClient, configured

    if configured() and not args.address:  # AIFACTORY_API_URL: go through the control API with our key
        return ControlClient.from_env(tenant=tenant.tenant if tenant else None,
                                      project=tenant.project if tenant else "default")
    return Client(address=args.address, tenant=tenant, home=home_of(args))


def _submit(args: argparse.Namespace) -> int:
    entrypoint = list(args.entrypoint)
    if entrypoint and entrypoint[0] == "--":
        entrypoint = entrypoint[1:]
    tenant = tenant_of(args)  # validate before touching the cluster: bad input submits nothing
    memory = parse_bytes(args.memory) if args.memory else None
    if not entrypoint:
        raise FactoryError("no entrypoint: put the command after `--`, e.g. factory submit --tenant t -- python x.py")
    client = _client(args, tenant=tenant)
    job_id = client.submit(
        entrypoint,
        workload=WorkloadKind(args.workload),
        working_dir=args.working_dir,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        lane=args.lane,
        memory_bytes=memory,
        submission_id=args.submission_id,
        **({"priority": args.priority} if args.priority is not None else {}),
    )
    print(job_id)
    if args.wait:
        _follow(client, job_id)
        record = client.get(job_id)
        print(f"job {job_id} {record.status}", file=sys.stderr)
        return 0 if record.status == "SUCCEEDED" else 1
    return 0


def _jobs(args: argparse.Namespace) -> int:
    records = _client(args).list(tenant=args.tenant)
    if args.format == "json":
        rows = [
            {**r.model_dump(), "age_s": r.age_s, "duration_s": r.duration_s}
            for r in records
        ]
        emit(rows, "json")
        return 0
    rows = [
        {
            "id": r.id,
            "tenant": r.tenant,
            "project": r.project,
            "workload": r.workload,
            "status": r.status,
            "age": human_duration(r.age_s),
            "entrypoint": (r.entrypoint or "")[:48],
        }
        for r in records
    ]
    emit(rows, "table")
    return 0


def _follow(client: Client, job_id: str) -> None:
    async def run():
        async for chunk in client.tail(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(run())


def _logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        _follow(client, args.job_id)
    else:
        sys.stdout.write(client.logs(args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = _client(args).stop(args.job_id)
    print("stopping" if stopped else "already finished")
    return 0
