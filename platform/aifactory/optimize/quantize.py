"""Quantization jobs: choose a method for the hardware, quantize a registered model, gate it, register it.

The methods and their module structures (``int8-dynamic``, ``bf16``, ``fp8-weight``) are built in
:mod:`aifactory.models.quantized`, where serving rebuilds them too (:func:`aifactory.models.build.build_model`).
``fp8-weight`` is offered only where the device has fp8 support (CUDA compute capability >= 8.9), chosen at
run time like the others.
"""

from __future__ import annotations

import torch
from torch import nn

from aifactory.exceptions import ConfigError
from aifactory.models.quantized import METHODS, quantize_model, quiet_deprecations


def fp8_supported() -> bool:
    """True on a CUDA device with fp8 tensor cores (Ada/Hopper and newer: compute capability >= 8.9)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def int8_supported() -> bool:
    """True when PyTorch has a quantized CPU engine (fbgemm / x86 / qnnpack)."""
    return bool(set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "qnnpack", "onednn"})


def resolve_method(method: str, *, cuda: bool | None = None) -> str:
    """The concrete method for ``method`` on this machine; ConfigError when the hardware cannot run it.

    ``auto`` picks bf16 on a GPU (fp8 needs a calibrated accuracy budget a default should not spend) and
    int8-dynamic on a CPU.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if method == "auto":
        return "bf16" if cuda else "int8-dynamic"
    if method not in METHODS:
        raise ConfigError("--method", [f"{method!r} is not a quantization method; choose one of auto, {', '.join(METHODS)}"])
    if method == "fp8-weight" and not fp8_supported():
        raise ConfigError("--method", [
            "fp8-weight needs a CUDA GPU with fp8 support (compute capability >= 8.9); this machine has "
            + (f"compute capability {torch.cuda.get_device_capability()}" if torch.cuda.is_available() else "no GPU")
            + "; use int8-dynamic (CPU) or bf16"])
    if method == "int8-dynamic" and not int8_supported():
        raise ConfigError("--method", ["int8-dynamic needs a quantized CPU engine (fbgemm/x86), which this torch lacks"])
    return method


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialized state (what a replica holds for its weights)."""
    import io

    buf = io.BytesIO()
    with quiet_deprecations():
        torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


# ---- the quantization job -------------------------------------------------------------------------------

def check_parent(parent_mv) -> None:
    """Refuse to quantize a version that is itself quantized (errors would compound, unmeasured)."""
    method = (parent_mv.manifest.get("variant") or {}).get("method")
    if method in METHODS:
        raise ConfigError("MODEL_VERSION", [f"{parent_mv.ref} is already a {method} variant; quantize its "
                                            f"float parent {parent_mv.manifest.get('parent')} instead"])


def run_quantize(home, ref: str, spec, *, batches=None, log=lambda msg: None):
    """Quantize registered model ``ref`` with ``spec`` (a QuantizeSpec), gate it, register the variant.

    ``batches`` (validation token batches) defaults to the parent's dataset validation split read through
    the data plane (no Ray cluster needed). Returns ``(ModelVersion, GateResult)``; a variant
    that fails the gate is registered not-servable and VariantRejected is raised.
    """
    from aifactory.config import config_hash
    from aifactory.tenancy import WorkloadKind
    from aifactory.workloads import Resources, Workload, launch

    # One process quantizes and gates in place (no Ray workers): it holds one CPU while it runs.
    workload = Workload(kind=WorkloadKind.OPTIMIZE, tenant=spec.tenant, name=f"quantize {ref} {spec.method}",
                        resources=Resources(cpu=1.0), config_hash=config_hash(spec))
    return launch(workload, home=home, run=lambda handle: _quantize(home, ref, spec, handle=handle,
                                                                     batches=batches, log=log))


def _quantize(home, ref: str, spec, *, handle, batches, log):
    import time

    from aifactory.config import config_hash
    from aifactory.optimize.gate import load_registered, measure, register_variant, validation_batches, variant_manifest
    from aifactory.provenance import code_version
    from aifactory.registry import ModelRegistry

    registry = ModelRegistry(home)
    method = resolve_method(spec.method)
    parent_mv, parent = load_registered(registry, ref)
    check_parent(parent_mv)
    t0 = time.perf_counter()
    variant = quantize_model(parent, method)
    quantize_s = time.perf_counter() - t0
    device = "cuda" if method in ("bf16", "fp8-weight") and torch.cuda.is_available() else "cpu"
    if batches is None:
        from aifactory.data.store import DatasetStore

        dataset = parent_mv.manifest.get("dataset_version")
        if not dataset:
            raise ConfigError("quality gate", [f"{parent_mv.ref} names no dataset_version; the gate has no validation split"])
        batches = validation_batches(DatasetStore(home).get(dataset), spec=spec.eval)
    log(f"quantize {parent_mv.ref}: {method} in {quantize_s:.2f}s; measuring on {len(batches)} validation batches ({device})")
    result = measure(parent.to(device), variant.to(device), batches, gate=spec.gate, device=device)
    log(f"quantize {parent_mv.ref}: val_loss parent {result.parent_val_loss:.4f}, variant {result.variant_val_loss:.4f} "
        f"(delta {result.quality_delta:+.4f}): {'PASS' if result.passed else 'FAIL'}")
    manifest = variant_manifest(
        parent_mv, result=result, tenant=spec.tenant.tenant, code_version=str(code_version()),
        config_hash=config_hash(spec), run_id=None,
        variant={"method": method, "requested_method": spec.method, "device": device, "torch": torch.__version__,
                 "weight_bytes": weight_bytes(variant), "parent_weight_bytes": weight_bytes(parent),
                 "quantize_s": round(quantize_s, 3)},
        extra={"project": spec.tenant.project, "precision": method},
    )
    from aifactory.registry.service import Registration

    registrar = Registration.from_env().registrar(home, tenant=spec.tenant.tenant)
    mv = register_variant(registrar, parent_mv.name, variant.cpu(), manifest=manifest, result=result)
    handle.ref("model", mv.ref)
    handle.event("checkpoint_validated", f"validated:{mv.version}")
    return mv, result
