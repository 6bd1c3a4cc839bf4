"""Quantized variants' module structures: the one place a quantized GPT is put together.

Methods (``variant["method"]`` in a registry manifest):

- ``int8-dynamic``: every ``nn.Linear`` becomes a dynamically quantized int8 Linear (weights int8 per
  tensor, activations quantized per batch at run time) through ``torch.ao.quantization.quantize_dynamic``.
  CPU only (fbgemm/x86 kernels). torch 2.13 still ships it (with a DeprecationWarning pointing at torchao);
  torchao's replacement is not needed for this and is not a dependency, so the warning is silenced here.
- ``bf16``: every floating-point parameter and buffer cast to bfloat16 (half the bytes); on GPUs the fast
  path, on CPUs without AMX usually slower than fp32.
- ``fp8-weight``: Linear weights stored as float8 e4m3 with a per-output-channel scale and up-cast at each
  call (weight-only: a quarter of fp32's bytes).

A quantized state dict only loads into the quantized module structure, so serving and the optimization
gate rebuild it (:func:`aifactory.models.build.build_model`) from what :func:`quantize_model` made.
Choosing a method for the hardware and gating the result belong to :mod:`aifactory.optimize.quantize`.
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
def quiet_deprecations():
    # torch.ao.quantization warns on every call in torch >= 2.9 (see the module docstring).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        yield


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
        with quiet_deprecations():
            return torch.ao.quantization.quantize_dynamic(model.cpu(), {nn.Linear}, dtype=torch.qint8)
    if method == "bf16":
        return model.to(torch.bfloat16)
    if method == "fp8-weight":
        _swap_linears(model, lambda lin: Fp8WeightLinear.from_linear(lin))
        return model
    raise ConfigError("method", [f"{method!r} is not a concrete quantization method ({', '.join(METHODS)})"])


def load_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """``model.load_state_dict(state)``, quietly for quantized modules (see :func:`quiet_deprecations`)."""
    with quiet_deprecations():
        model.load_state_dict(state)
    return model.eval()
