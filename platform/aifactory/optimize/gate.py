"""The quality gate of optimized variants, and their registration with lineage.

A variant (quantized or distilled) is measured against its parent on the parent's dataset validation
split, read through the data plane's contract (:func:`validation_batches`: checked shards, in the
deterministic feed's order, the same rows every time). Parent and variant see the very same batches in the same process; the *quality
delta* is ``variant_val_loss - parent_val_loss`` (nats per token; positive = worse). A variant whose delta
exceeds the gate's allowance is still registered (its lineage and evidence are kept) but not servable,
and the command raises :class:`~aifactory.exceptions.VariantRejected` saying why.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aifactory.exceptions import ConfigError, VariantRejected
from aifactory.optimize.config import EvalSpec, VariantGate


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict with the measurements it rests on."""

    passed: bool
    parent_val_loss: float
    variant_val_loss: float
    quality_delta: float
    reason: str
    max_loss_delta: float
    max_relative_delta: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gate(*, parent_val_loss: float, variant_val_loss: float, gate: VariantGate) -> GateResult:
    """Pure: does a variant with ``variant_val_loss`` pass ``gate`` against ``parent_val_loss``?"""
    delta = variant_val_loss - parent_val_loss
    reason = ""
    if not (math.isfinite(parent_val_loss) and math.isfinite(variant_val_loss)):
        reason = f"validation loss is not finite (parent {parent_val_loss}, variant {variant_val_loss})"
    elif delta > gate.max_loss_delta:
        reason = (f"validation loss {variant_val_loss:.4f} is {delta:+.4f} over the parent's {parent_val_loss:.4f}; "
                  f"the gate allows at most +{gate.max_loss_delta:g} (max_loss_delta)")
    elif gate.max_relative_delta is not None and parent_val_loss > 0 and delta / parent_val_loss > gate.max_relative_delta:
        reason = (f"validation loss {variant_val_loss:.4f} is {100 * delta / parent_val_loss:+.2f}% over the parent's "
                  f"{parent_val_loss:.4f}; the gate allows at most +{100 * gate.max_relative_delta:g}% (max_relative_delta)")
    return GateResult(passed=not reason, parent_val_loss=parent_val_loss, variant_val_loss=variant_val_loss,
                      quality_delta=delta, reason=reason or "within the gate", max_loss_delta=gate.max_loss_delta,
                      max_relative_delta=gate.max_relative_delta)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name:v3"`` -> ``("name", "v3")``; ``"name"`` -> ``("name", None)`` (the newest servable)."""
    name, _, version = ref.partition(":")
    if not name:
        raise ConfigError("MODEL_VERSION", [f"{ref!r} is not a model reference; use NAME:VERSION (e.g. tiny-gpt:v3) or NAME"])
    return name, version or None


def load_registered(registry, ref: str):
    """``(ModelVersion, model)`` for ``ref``, signature and digest verified, with its variant's structure."""
    import torch

    from aifactory.models.build import build_model
    from aifactory.models.quantized import load_state

    mv = registry.verify(registry.get(*parse_ref(ref)))
    model = build_model(mv.model_config, mv.manifest.get("variant"))
    state = torch.load(mv.weights_path, map_location="cpu", weights_only=True)
    return mv, load_state(model, state)


def validation_batches(version, *, spec: EvalSpec) -> list:
    """Up to ``spec.max_batches`` ``(B, seq_len)`` int64 batches of the version's validation split.

    The split's contract is checked first (shards present, sizes, sha256, schema: ``DatasetVersion.validate``)
    and the shards are read in the data plane's deterministic order (rank 0 of 1, seed 0, epoch 0: the order
    ``read_deterministic`` gives), so every measurement of every variant of a parent sees the same rows. They
    are read here with pyarrow rather than as a Ray Dataset: a gate reads a few batches, and on a busy
    cluster Ray Data's start-up (~20 s measured) would dwarf the read; no cluster is needed either.
    """
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from aifactory.data.feed import deterministic_files
    from aifactory.data.store import join

    version.validate(splits=["validation"], checksum=True)
    fs, base = version.filesystem()
    paths = deterministic_files([join(base, s.path) for s in version.manifest.shards_of("validation")],
                                rank=0, world_size=1, seed=0, epoch=0)
    rows: list = []
    need = spec.batch_size * spec.max_batches
    for path in paths:
        with fs.open_input_file(path) as f:
            column = pq.read_table(f, columns=["tokens"]).column("tokens").combine_chunks()
        width = column.type.list_size
        rows.append(np.asarray(column.values).reshape(-1, width))
        if sum(len(r) for r in rows) >= need:
            break
    tokens = torch.from_numpy(np.concatenate(rows)[:need].astype(np.int64)) if rows else torch.empty(0, 0)
    out = list(torch.split(tokens, spec.batch_size)) if len(tokens) else []
    if not out:
        raise ConfigError("quality gate", [f"dataset {version.version} has no validation rows to measure a variant on"])
    return out


def eval_loss(model, batches: Iterable, *, seq_len: int | None = None, device: str = "cpu") -> float:
    """Mean next-token cross-entropy (nats/token, PAD ignored) of ``model`` over ``batches``."""
    import torch
    import torch.nn.functional as F

    from aifactory.data.tokenizer import PAD

    limit = seq_len or model.config.seq_len
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for tokens in batches:
            n = min(limit, tokens.shape[1] - 1)
            x, y = tokens[:, :n].to(device), tokens[:, 1 : n + 1].to(device)
            logits = model(x).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           ignore_index=PAD, reduction="sum"))
            count += int((y != PAD).sum())
    return total / count if count else float("nan")


def measure(parent, variant, batches: Sequence, *, gate: VariantGate, device: str = "cpu") -> GateResult:
    """Both models on the same batches (the shorter context of the two bounds the sequence length)."""
    seq_len = min(parent.config.seq_len, variant.config.seq_len)
    return check_gate(parent_val_loss=eval_loss(parent, batches, seq_len=seq_len, device=device),
                      variant_val_loss=eval_loss(variant, batches, seq_len=seq_len, device=device), gate=gate)


def variant_manifest(parent_mv, *, variant: dict[str, Any], result: GateResult, tenant: str, code_version: str,
                     config_hash: str, run_id: str | None, dataset_version: str | None = None,
                     seed: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a variant: lineage to its parent (and dataset), method, measured quality delta, gate."""
    dataset = dataset_version or parent_mv.manifest.get("dataset_version")
    return {
        "dataset_version": dataset,
        "code_version": code_version,
        "config_hash": config_hash,
        "seed": parent_mv.manifest.get("seed") if seed is None else seed,
        "metrics": {"val_loss": result.variant_val_loss, "parent_val_loss": result.parent_val_loss,
                    "quality_delta": result.quality_delta},
        "tenant": tenant,
        "run_id": run_id,
        "parent": parent_mv.ref,
        "parent_sha256": parent_mv.sha256,
        "tokenizer": parent_mv.manifest.get("tokenizer", "byte"),
        "variant": {**variant, "parent": parent_mv.ref, "quality_delta": result.quality_delta,
                    "gate": result.to_dict(), "eval_split": f"{dataset}/validation"},
        **(extra or {}),
    }


def register_variant(registrar, name: str, model, *, manifest: dict[str, Any], result: GateResult):
    """Register ``model``'s state as the next version of ``name`` (servable only if the gate passed) through
    ``registrar`` (:meth:`aifactory.registry.service.Registration.registrar`: the control plane stamps the
    tenant, checks the lineage and signs).

    Raises VariantRejected after registering a failed variant, so the caller's command says why.
    """
    import torch

    from aifactory.models.quantized import quiet_deprecations

    with tempfile.TemporaryDirectory(prefix="aif-variant-") as tmp:
        path = os.path.join(tmp, "weights.pt")
        with quiet_deprecations():
            torch.save(model.state_dict(), path)
        cfg = model.config.model_dump(mode="json")
        mv = registrar.register(name, weights_path=path, model_config=cfg, manifest=manifest, servable=result.passed)
    if not result.passed:
        raise VariantRejected(mv.ref, result.reason)
    return mv
