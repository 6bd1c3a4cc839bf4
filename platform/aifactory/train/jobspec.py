"""Command-line overrides of a :class:`TrainJob` (recipes are looked up in :mod:`aifactory.recipes`)."""

from __future__ import annotations

from typing import Any

from aifactory.config import parse_config
from aifactory.train.config import TrainJob


def apply_overrides(job: TrainJob, *, dataset: str | None = None, max_steps: int | None = None,
                    workers: int | None = None, tenant: str | None = None) -> TrainJob:
    """The job with CLI overrides; ``max_steps`` also shortens the checkpoint interval and warmup to fit."""
    data: dict[str, Any] = job.model_dump(mode="json")
    if dataset:
        data["data"]["dataset_version"] = dataset
    if max_steps is not None:
        data["steps"] = max_steps
        data["checkpoint"]["every_steps"] = max(1, min(data["checkpoint"]["every_steps"], max_steps))
        data["optimizer"]["warmup_steps"] = max(0, min(data["optimizer"]["warmup_steps"], max_steps - 1))
    if workers is not None:
        data["scaling"]["num_workers"] = workers
    if tenant:
        data["tenant"]["tenant"] = tenant
    return parse_config(TrainJob, data, source="train job (after --dataset/--max-steps/--workers/--tenant)")
