"""Quantized variants: transform a float model, and rebuild a variant's structure before loading its weights.

Methods (``variant["method"]`` in a registry manifest):

- ``int8-dynamic``: every ``nn.Linear`` becomes a dynamically quantized int8 Linear (weights int8 per
  tensor, activations quantized per batch at run time) through ``torch.ao.quantization.quantize_dynamic``.
  CPU only (fbgemm/x86 kernels). torch 2.13 still ships it (with a DeprecationWarning pointing at torchao);
  torchao's replacement is not needed for this and is not a dependency, so the warning is silenced here.
- ``bf16``: every floating-point parameter and buffer cast to bfloat16 (half the bytes); on GPUs the fast
  path, on CPUs without AMX usually slower than fp32.
- ``fp8-weight``: Linear weights stored as float8 e4m3 with a per-output-channel scale and up-cast at each
  call (weight-only: a quarter of fp32's bytes). Offered only where the device has fp8 support (CUDA compute
  capability >= 8.9), chosen at run time like the others.

A quantized state dict only loads into the quantized module structure: :func:`build_model` makes the
structure from ``(model_config, variant)`` so the serving engine can load any registered variant.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aifactory.exceptions import ConfigError

METHODS = ("int8-dynamic", "bf16", "fp8-weight")
FP8_DTYPE = torch.float8_e4m3fn


@contextlib.contextmanager
def _quiet_deprecations():
    # torch.ao.quantization warns on every call in torch >= 2.9 (see the module docstring).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        yield


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


class Fp8WeightLinear(nn.Module):
    """A Linear whose weight is stored as float8 e4m3 with a per-output-channel fp32 scale (weight-only fp8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, compute_dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, compute_dtype=torch.bfloat16) -> Fp8WeightLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype=compute_dtype)
        w = lin.weight.detach().float()
        # Per-row absmax maps onto e4m3's largest finite value (448), so no row saturates.
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(FP8_DTYPE).max
        m.weight = (w / scale).to(FP8_DTYPE).to(lin.weight.device)
        m.scale = scale.to(lin.weight.device)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight.to(torch.float32) * self.scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _swap_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """A quantized copy of float ``model`` (eval mode, CPU for int8); ``method`` is a concrete one."""
    import copy

    model = copy.deepcopy(model).eval()
    if method == "int8-dynamic":
        with _quiet_deprecations():
            return torch.ao.quantization.quantize_dynamic(model.cpu(), {nn.Linear}, dtype=torch.qint8)
    if method == "bf16":
        return model.to(torch.bfloat16)
    if method == "fp8-weight":
        _swap_linears(model, lambda lin: Fp8WeightLinear.from_linear(lin))
        return model
    raise ConfigError("method", [f"{method!r} is not a concrete quantization method ({', '.join(METHODS)})"])


def build_model(model_config: dict[str, Any], variant: dict[str, Any] | None) -> nn.Module:
    """An empty :class:`~aifactory.models.gpt.GPT` with ``variant``'s structure, ready for ``load_state_dict``.

    ``variant`` is a registry manifest's ``variant`` entry (None or a distilled student: a plain GPT).
    """
    from aifactory.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.model_validate(model_config)).eval()
    method = (variant or {}).get("method")
    if method in (None, "distill"):
        return model
    if method in METHODS:
        return quantize_model(model, method)
    raise ConfigError("model manifest", [f"variant.method: {method!r} is unknown to this code version"])


def load_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """``model.load_state_dict(state)``, quietly for quantized modules (see :func:`_quiet_deprecations`)."""
    with _quiet_deprecations():
        model.load_state_dict(state)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialized state (what a replica holds for its weights)."""
    import io

    buf = io.BytesIO()
    with _quiet_deprecations():
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
    mv = register_variant(registry, parent_mv.name, variant.cpu(), manifest=manifest, result=result)
    handle.ref("model", mv.ref)
    handle.event("checkpoint_validated", f"validated:{mv.version}")
    return mv, result
