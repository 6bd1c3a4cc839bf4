"""Device, process-group backend and precision context: the same code on CPU (gloo) and GPU (NCCL).

The sharded model itself (FSDP2 per block and on the root, or DDP) is built in
:mod:`aifactory.models.build` (``build_sharded``, ``shard_model``). Here: which device and backend a worker
uses, and the forward's autocast for ``ddp`` + ``bf16-mixed`` (weights and gradients stay fp32), which FSDP2's
``MixedPrecisionPolicy`` does not need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    backend: str
    name: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def backend_for(use_gpu: bool) -> str:
    """The collective backend: NCCL for GPUs, gloo for CPUs."""
    return "nccl" if use_gpu else "gloo"


def resolve_use_gpu(requested: bool | None, *, cluster_gpus: float) -> bool:
    """``requested`` when given; otherwise use GPUs exactly when the cluster has some."""
    return bool(cluster_gpus > 0) if requested is None else requested


def current_device(local_rank: int = 0) -> DeviceInfo:
    """The worker's device, chosen at run time from what the process can see."""
    if torch.cuda.is_available():
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return DeviceInfo(torch.device("cuda", idx), "nccl", torch.cuda.get_device_name(idx))
    return DeviceInfo(torch.device("cpu"), "gloo", "cpu")


# glibc's M_MMAP_THRESHOLD (malloc.h): allocations at least this big are mmapped and unmapped when freed.
_M_MMAP_THRESHOLD = -3


def pin_cpu_malloc_threshold(threshold_bytes: int = 128 << 10) -> bool:
    """Pin glibc malloc's mmap threshold so that large freed tensors go back to the OS. True when set.

    glibc starts at 128 KiB but raises the threshold to the size of each mmapped block freed (up to 32 MiB),
    after which such blocks come from the heap and are not returned. FSDP2 allocates and frees per-block
    all-gather and gradient buffers every step, so on CPU the worker's RSS then grew step after step
    (measured with bench_state_heavy, 2 gloo ranks: +356 MiB -> +1781 MiB over 3 steps, still growing),
    while with the threshold pinned at 128 KiB it stayed flat (peak +1079 MiB, the sharded state plus
    transients). Pinning costs some page faults per step. Not glibc (musl, macOS): returns False, no change.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def autocast_context(*, sharding: str, precision: str, device: torch.device):
    """The forward-pass context: autocast for DDP + bf16-mixed; FSDP2's policy casts by itself."""
    if precision == "bf16-mixed" and sharding == "ddp":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modifies the module in place)."""
    return getattr(model, "module", model)


class ComputeDtypeProbe:
    """The dtypes a model really computes in, seen from inside the forward of its first ``nn.Linear``.

    Why measured, not read from the config: FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` casts the
    all-gathered parameters only while a unit runs (the stored shards stay fp32), and DDP + ``bf16-mixed``
    keeps fp32 weights and lets autocast run the matmuls in bf16. So the truth is in forward: ``param`` is the
    weight's dtype the layer computes with, ``output`` the dtype its matmul produced. Fires once (the first
    forward), then removes itself, so training steps pay nothing.
    """

    def __init__(self, model: nn.Module):
        self.param: str | None = None
        self.output: str | None = None
        # At rest (before a forward, when FSDP2's root may keep the unsharded bf16 copies registered).
        first = next((p for p in unwrap(model).parameters()), None)
        self.stored = str(first.dtype).removeprefix("torch.") if first is not None else None
        target = next((m for m in unwrap(model).modules() if isinstance(m, nn.Linear)), None)
        self._handle = target.register_forward_hook(self._seen) if target is not None else None

    def _seen(self, module: nn.Module, _inputs, output) -> None:
        weight = module.weight
        self.param = str(weight.dtype).removeprefix("torch.")
        self.output = str(output.dtype).removeprefix("torch.")
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def summary(self) -> dict[str, str | None]:
        """What forward used, and the dtype the parameters are stored (and optimised) in."""
        return {"compute_param_dtype": self.param, "compute_output_dtype": self.output,
                "stored_param_dtype": self.stored}
