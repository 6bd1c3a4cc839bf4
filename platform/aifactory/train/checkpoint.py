"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP) through Ray Train's checkpoint reporting.

Each rank ``dcp.save``s its shard into a local temp dir (rank 0 also writes ``.metadata`` and
``trainer_state.json``) and reports it with ``checkpoint_dir_name=f"step_{step:05d}"``; Ray Train merges
the ranks' files into one directory under the run's storage path and keeps the last few.

Resume: ``ray.train.get_checkpoint()`` when Ray has one. A worker killed within ~2 s after a report can
lose that checkpoint's registration (written, not yet recorded: ../shared/RAY-2.60-NOTES.md, "Train"), and
the restarted group then sees ``None`` or an older one; :func:`newest_complete_checkpoint` falls back to
the newest *complete* directory in storage (``.metadata``, ``trainer_state.json`` and every shard file the
metadata names are present), so the run loses at most one checkpoint interval.

Each rank also writes its RNG state (``rng_state_rank<r>.pt``, CPU and the current CUDA device): a resumed
run reseeds at start, so without it dropout would draw other masks than the uninterrupted run after the
resume step. A checkpoint without the file (older ones, or a rank a resharded run did not have) resumes
with the seeded state.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state_rank{rank}.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:05d}"


def _app_state(model, optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(path: str, *, model, optimizer, trainer_state: dict[str, Any]) -> None:
    """DCP-save this rank's shard of model + optimizer into ``path``; rank 0 adds the trainer state."""
    os.makedirs(path, exist_ok=True)
    dcp.save(_app_state(model, optimizer), checkpoint_id=path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(path, RNG_FILE.format(rank=rank)))
    if rank == 0:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump(trainer_state, f)


def load_sharded(path: str, *, model, optimizer) -> dict[str, Any]:
    """Load model + optimizer shards from ``path`` (any world size DCP can reshard to); return the trainer state."""
    state = _app_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(path, RNG_FILE.format(rank=dist.get_rank() if dist.is_initialized() else 0))
    if os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def consolidated_model_state(model) -> dict[str, torch.Tensor] | None:
    """The full, unsharded fp32 model state dict on rank 0 (None elsewhere). A collective: call on every rank."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().to(torch.float32).clone() for k, v in full.items()}


def is_complete(path: str | Path) -> bool:
    """True when ``path`` holds a whole DCP checkpoint: metadata, trainer state, and every shard file it names."""
    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / STATE_FILE).is_file():
        return False
    try:
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(path)).read_metadata()
        files = {item.relative_path for item in (meta.storage_data or {}).values()}
    except Exception:  # unreadable metadata means an incomplete write
        return False
    return all((path / f).is_file() for f in files)


def newest_complete_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """``(step, path)`` of the newest complete ``step_NNNNN`` checkpoint under a local run dir, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
        reverse=True,
    )
    for step, p in found:
        if is_complete(p):
            return step, p
    return None


def choose_resume(reported: tuple[int, str] | None, fallback: tuple[int, Path] | None) -> tuple[int, str] | None:
    """Resume from whichever of Ray's reported checkpoint and the newest complete dir is further along."""
    candidates = [c for c in (reported, (fallback[0], str(fallback[1])) if fallback else None) if c is not None]
    return max(candidates, key=lambda c: c[0]) if candidates else None


def step_of(path: str) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None
