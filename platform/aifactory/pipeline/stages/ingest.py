"""The ``ingest`` stage of ``factory run``: a small real dataset version for the stages after it."""

from __future__ import annotations

from aifactory.pipeline.runner import RunContext, StageResult

# ~2 MB of stdlib source in rows of 128 tokens: ~15k train rows in ~10-20 s on 2 cores, enough for the
# train stage's few steps; a rerun on the same machine is a cache hit.
STAGE_MAX_MB = 2.0
STAGE_SEQ_LEN = 128
STAGE_SHARD_MB = 0.5


def ingest_stage(ctx: RunContext) -> StageResult:
    """Ingest the stdlib corpus on the running cluster; sets ``ctx.artifacts["dataset_version"]``."""
    from aifactory.data.ingest import IngestConfig, ingest

    cfg = IngestConfig(max_mb=STAGE_MAX_MB, seq_len=STAGE_SEQ_LEN, target_shard_mb=STAGE_SHARD_MB)
    result = ingest(ctx.home, cfg, tenant=ctx.tenant, log=ctx.log)
    ctx.artifacts["dataset_version"] = result.version
    s = result.summary()
    return StageResult(
        summary={k: s[k] for k in ("version", "cache_hit", "train_rows", "validation_rows", "train_tokens", "shards")},
        note="(cache hit)" if result.cache_hit else "",
    )
