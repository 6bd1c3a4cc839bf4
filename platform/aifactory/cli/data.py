"""``factory ingest | datasets | datasets verify | embed``: the data plane from the command line."""

from __future__ import annotations

import argparse
import contextlib
import sys

from aifactory.cli._common import add_address, add_tenant, home_of, tenant_of
from aifactory.cli._output import add_format, emit, emit_obj, progress
from aifactory.exceptions import ConfigError, DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="tokenize a directory of text files into a versioned Parquet dataset")
    p.add_argument("source", nargs="?", help="directory (or URI) of text files (default: Python's stdlib source)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=256, help="tokens per packed row (default 256)")
    p.add_argument("--max-mb", dest="max_mb", type=float, help="ingest at most this many MB of source")
    p.add_argument("--target-shard-mb", dest="target_shard_mb", type=float, default=1.0, help="shard size (default 1)")
    p.add_argument("--validation-fraction", dest="validation_fraction", type=float, default=0.05,
                   help="share of documents held out (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--allow-drift", dest="allow_drift", action="store_true",
                   help="publish even if the drift bounds against the previous version are broken")
    p.add_argument("--num-cpus", dest="num_cpus", type=int, help="logical CPUs of an embedded cluster")
    add_tenant(p, required=False)
    add_address(p)
    add_format(p)
    p.set_defaults(func=_ingest, tenant="demo")

    p = sub.add_parser("datasets", help="list dataset versions; `factory datasets verify VERSION` checks one")
    add_format(p)
    dsub = p.add_subparsers(dest="datasets_command", metavar="SUBCOMMAND")
    v = dsub.add_parser("verify", help="check every shard's checksum and the contract; non-zero exit if broken")
    v.add_argument("version")
    add_format(v)
    v.set_defaults(func=_verify)
    p.set_defaults(func=_datasets)

    p = sub.add_parser("embed", help="batch embeddings with the pretrained MiniLM over a directory of text files")
    p.add_argument("source", nargs="?", help="directory of text files (default: Python's stdlib source)")
    p.add_argument("--max-docs", dest="max_docs", type=int, default=32, help="documents to embed (default 32)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="passages per model call")
    p.add_argument("--num-actors", dest="num_actors", type=int, default=1, help="model actors in the pool")
    add_tenant(p, required=False)
    add_address(p)
    add_format(p)
    p.set_defaults(func=_embed, tenant="demo")


@contextlib.contextmanager
def _ray(args, home, tenant, workload, entrypoint: str):
    """In-process on the cluster of --address / RAY_ADDRESS / `factory up`, else an embedded one."""
    from aifactory.cluster.connect import ray_session, resolve_address

    address = resolve_address(home, args.address)
    progress("starting an embedded Ray cluster ..." if address is None else f"using the cluster at {address.dashboard_url}")
    with ray_session(home, address=address, tenant=tenant, workload=workload, entrypoint=entrypoint,
                     num_cpus=getattr(args, "num_cpus", None)):
        yield


def _ingest(args: argparse.Namespace) -> int:
    from aifactory.config import parse_config
    from aifactory.data.ingest import IngestConfig, ingest
    from aifactory.tenancy import WorkloadKind

    home = home_of(args).ensure()
    tenant = tenant_of(args)
    fields = ("source", "seq_len", "max_mb", "target_shard_mb", "validation_fraction", "seed", "allow_drift")
    cfg = parse_config(IngestConfig, {k: getattr(args, k) for k in fields if getattr(args, k) is not None},
                       source="ingest flags")
    _check_source(cfg.source)
    with _ray(args, home, tenant, WorkloadKind.INGEST, "factory ingest"):
        result = ingest(home, cfg, tenant=tenant, log=progress)
    if args.format == "json":
        emit_obj(result.summary(), "json")
    else:
        print(result.version + (" (cache hit: nothing reprocessed)" if result.cache_hit else ""))
    return 0


def _check_source(source: str | None) -> None:
    from pathlib import Path

    from aifactory.home import is_uri

    if source and not is_uri(source) and not Path(source).is_dir():
        raise ConfigError("factory ingest", [f"SOURCE_DIR: {source!r} is not a directory"])


def _datasets(args: argparse.Namespace) -> int:
    from aifactory.data.store import DatasetStore

    rows = []
    for v in reversed(DatasetStore(home_of(args)).list()):
        m = v.manifest
        rows.append({
            "version": v.version, "created": m.created_at[:19], "tenant": m.tenant, "seq_len": m.seq_len,
            "train_rows": m.splits["train"].rows, "validation_rows": m.splits["validation"].rows,
            "tokens": m.total_tokens, "mb": round(m.total_bytes / 1e6, 2), "shards": len(m.shards),
            "parent": m.lineage.parent, "code": m.lineage.code_version + ("-dirty" if m.lineage.code_dirty else ""),
            "source": m.source.location, **({"manifest": v.manifest_path} if args.format == "json" else {}),
        })
    emit(rows, args.format)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from aifactory.data.store import DatasetStore

    problems = DatasetStore(home_of(args)).verify(args.version)
    if args.format == "json":
        emit_obj({"version": args.version, "ok": not problems,
                  "problems": [{"file": p.path, "rule": p.rule, "detail": p.detail} for p in problems]}, "json")
    elif not problems:
        print(f"{args.version}: ok (every shard's checksum, schema, rows, nulls, token range and drift bounds)")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"error: {args.version}: {len(problems)} contract problem(s) in "
              f"{len({p.path for p in problems})} file(s)", file=sys.stderr)
        return DataError.exit_code
    return 0


def _embed(args: argparse.Namespace) -> int:
    from aifactory.config import parse_config
    from aifactory.data.embed import EmbedConfig, run_batch_embed
    from aifactory.tenancy import WorkloadKind

    home = home_of(args).ensure()
    tenant = tenant_of(args)
    cfg = parse_config(EmbedConfig, {"source": args.source, "max_docs": args.max_docs, "batch_size": args.batch_size,
                                     "num_actors": args.num_actors}, source="embed flags")
    _check_source(cfg.source)
    with _ray(args, home, tenant, WorkloadKind.BATCH_INFERENCE, "factory embed"):
        result = run_batch_embed(home, cfg, tenant=tenant, log=progress)
    if args.format == "json":
        emit_obj(result.summary(), "json")
    else:
        print(result.dataset.version + (" (cache hit)" if result.cache_hit else ""))
    return 0
