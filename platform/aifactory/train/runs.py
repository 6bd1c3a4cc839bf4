"""Run manifests under ``FactoryHome.runs_dir``: what ran (job config, dataset, code, seed), how it went
(status, metrics, validation curve, registered versions), and enough to re-execute it (``factory rerun``)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

from aifactory.exceptions import NotFound
from aifactory.home import FactoryHome

MANIFEST = "manifest.json"
RERUN_TOLERANCE = 1e-3
"""Largest absolute difference of validation losses at which a rerun counts as reproducing its run."""


def new_run_id(prefix: str = "train") -> str:
    return f"{prefix}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def manifest_path(home: FactoryHome, run_id: str) -> Path:
    return home.runs_dir / run_id / MANIFEST


def write_manifest(home: FactoryHome, run_id: str, manifest: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so readers never see half a manifest."""
    path = manifest_path(home, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str, allow_nan=True))
    os.replace(tmp, path)
    return path


def read_manifest(home: FactoryHome, run_id: str) -> dict[str, Any]:
    path = manifest_path(home, run_id)
    if not path.is_file():
        raise NotFound("run", run_id, f"no {path}; run ids are the directories under {home.runs_dir}")
    return json.loads(path.read_text())


def list_runs(home: FactoryHome) -> list[dict[str, Any]]:
    if not home.runs_dir.is_dir():
        return []
    out = []
    for d in sorted(home.runs_dir.iterdir()):
        if (d / MANIFEST).is_file():
            out.append(json.loads((d / MANIFEST).read_text()))
    return out


def compare_curves(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Step-by-step validation-loss comparison of two runs' curves."""
    va = {e["step"]: e["val_loss"] for e in a}
    vb = {e["step"]: e["val_loss"] for e in b}
    common = sorted(set(va) & set(vb))
    diffs = [abs(va[s] - vb[s]) for s in common]
    max_diff = max(diffs) if diffs else float("inf")
    return {
        "steps_compared": common,
        "max_abs_diff": max_diff,
        "tolerance": RERUN_TOLERANCE,
        "reproduced": bool(common) and set(va) == set(vb) and max_diff <= RERUN_TOLERANCE,
    }
