"""The ``train`` stage of ``factory run``: a short FSDP2 + bf16 run that ends with a validated, registered model."""

from __future__ import annotations

from aifactory.pipeline.runner import RunContext, StageResult


def train_stage(ctx: RunContext) -> StageResult:
    from aifactory.recipes import load_recipe
    from aifactory.train.jobspec import apply_overrides
    from aifactory.train.runner import run_training

    job = apply_overrides(load_recipe("pipeline", tenant=ctx.tenant.tenant),
                          dataset=ctx.artifacts.get("dataset_version"))
    out = run_training(job, home=ctx.home, log=ctx.log)
    m = out.metrics
    ctx.artifacts.update(run_id=out.run_id, model_name=out.model_name, model_version=out.model_version)
    ok = out.model_version is not None
    mfu = m.get("mfu")
    return StageResult(
        ok=ok,
        summary={
            "run": out.run_id, "model": f"{out.model_name}:{out.model_version}", "val_loss": round(out.final_val_loss, 3),
            "tokens_per_s": round(m.get("tokens_per_s", 0.0)), "data_wait": f"{100 * m.get('data_wait_fraction', 0):.1f}%",
            "mfu": f"{100 * mfu:.2f}%" if isinstance(mfu, float) else mfu,
        },
        note="" if ok else "(no checkpoint passed the quality gate)",
    )
