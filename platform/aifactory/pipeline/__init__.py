"""``factory run``: the whole factory end to end, stage by stage, with progress and a summary."""

from aifactory.pipeline.runner import RunContext, Stage, StageResult, run_pipeline

__all__ = ["RunContext", "Stage", "StageResult", "run_pipeline"]
