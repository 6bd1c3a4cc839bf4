"""Device, process-group backend, sharding and precision: the same code on CPU (gloo) and GPU (NCCL).

- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and then on the
  root, so each block's parameters are gathered just in time and freed after use. With ``bf16-mixed`` the
  :class:`MixedPrecisionPolicy` casts parameters to bf16 for compute and reduces gradients in fp32; the
  sharded parameters the optimizer updates stay fp32 (master weights).
- ``ddp``: ``DistributedDataParallel`` with a full fp32 replica per worker; ``bf16-mixed`` then runs the
  forward under ``torch.autocast(bf16)`` (weights and gradients stay fp32).
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


def build_model(config, *, sharding: str, precision: str, device: torch.device, seed: int) -> nn.Module:
    """A :class:`~aifactory.models.gpt.GPT` for training, wrapped by :func:`shard_model`, its weights from ``seed``.

    The model is built on the meta device (no memory), sharded, then materialised with ``to_empty`` and
    initialised by :meth:`GPT.init_weights`: under FSDP2 no rank ever holds the full fp32 model, only its
    shard plus one full parameter at a time. DDP and FSDP runs with the same seed start from identical
    weights. Requires an initialised process group.
    """
    from aifactory.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    fsdp = sharding == "fsdp"
    if fsdp:  # shard first, so that materialising allocates only this rank's shards
        model = shard_model(model, sharding=sharding, precision=precision, device=device)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model if fsdp else shard_model(model, sharding=sharding, precision=precision, device=device)


def shard_model(model: nn.Module, *, sharding: str, precision: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` for data-parallel training. Requires an initialised process group.

    A model on the meta device stays there (FSDP2 shards meta parameters; see :func:`build_model`)."""
    if not any(p.is_meta for p in model.parameters()):
        model = model.to(device)
    if sharding == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if precision == "bf16-mixed":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raise ValueError(f"unknown sharding {sharding!r}; expected 'fsdp' or 'ddp'")


def autocast_context(*, sharding: str, precision: str, device: torch.device):
    """The forward-pass context: autocast for DDP + bf16-mixed; FSDP2's policy casts by itself."""
    if precision == "bf16-mixed" and sharding == "ddp":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modifies the module in place)."""
    return getattr(model, "module", model)
