"""ray job submit --working-dir . --metadata-json '{"tenant": "demo", "workload": "ingest"}' -- python -m jobs.ingest --max-mb 2

Ingest a directory of text files (default: this interpreter's stdlib source) into a versioned,
contract-checked Parquet dataset in the factory home's dataset store, and print the version as JSON.
Runs on the cluster it is submitted to (RAY_ADDRESS), or on an embedded one when started directly
(`python -m jobs.ingest --max-mb 2`). The library does the work: aifactory.data.ingest.
"""

from __future__ import annotations

import argparse
import json

from aifactory.cluster.connect import ray_session, resolve_address
from aifactory.data.ingest import IngestConfig, ingest
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef, WorkloadKind


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-mb", type=float)
    p.add_argument("--target-shard-mb", type=float, default=1.0)
    p.add_argument("--tenant", default="demo")
    p.add_argument("--project", default="default")
    args = p.parse_args(argv)
    home = FactoryHome.from_env().ensure()
    tenant = TenantRef(tenant=args.tenant, project=args.project)
    cfg = IngestConfig(source=args.source, seq_len=args.seq_len, max_mb=args.max_mb, target_shard_mb=args.target_shard_mb)
    with ray_session(home, address=resolve_address(home), tenant=tenant, workload=WorkloadKind.INGEST,
                     entrypoint="jobs.ingest"):
        result = ingest(home, cfg, tenant=tenant, log=lambda msg: print(msg, flush=True))
        print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
