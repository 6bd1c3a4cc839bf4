"""Model construction, in one place: a plain GPT, a registered variant's structure, a sharded training model.

Training, distillation, the benchmark's training trial, the optimization gate and serving all build their
models here (issue 15 point 3), so "how is a model put together?" has one answer:

- :func:`build_model`: an empty :class:`~aifactory.models.gpt.GPT` with a registered version's structure
  (plain, distilled, or a quantized variant from :mod:`aifactory.models.quantized`), ready for
  ``load_state_dict``: what serving and the optimization gate load registered weights into;
- :func:`build_sharded`: a GPT for data-parallel training, built on the meta device, wrapped by
  :func:`shard_model` and initialised from a seed;
- :func:`shard_model`: the data-parallel wrapping (FSDP2 per block and on the root, or DDP).

``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and then on the root,
so each block's parameters are gathered just in time and freed after use. With ``bf16-mixed`` the
``MixedPrecisionPolicy`` casts parameters to bf16 for compute and reduces gradients in fp32; the sharded
parameters the optimizer updates stay fp32 (master weights). ``ddp``: ``DistributedDataParallel`` with a
full fp32 replica per worker (``bf16-mixed`` then autocasts the forward: ``aifactory.train.parallel``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aifactory.exceptions import ConfigError
from aifactory.models.config import GPTConfig
from aifactory.models.gpt import GPT


def build_model(model_config: dict[str, Any] | GPTConfig, variant: dict[str, Any] | None = None) -> nn.Module:
    """An empty GPT (eval mode) with ``variant``'s structure, ready for ``load_state_dict``.

    ``variant`` is a registry manifest's ``variant`` entry: None or a distilled student (a plain GPT), or a
    quantized variant (``{"method": "int8-dynamic" | "bf16" | "fp8-weight"}``).
    """
    from aifactory.models.quantized import METHODS, quantize_model

    cfg = model_config if isinstance(model_config, GPTConfig) else GPTConfig.model_validate(model_config)
    model = GPT(cfg).eval()
    method = (variant or {}).get("method")
    if method in (None, "distill"):
        return model
    if method in METHODS:
        return quantize_model(model, method)
    raise ConfigError("model manifest", [f"variant.method: {method!r} is unknown to this code version"])


def build_sharded(config: GPTConfig, *, sharding: str, precision: str, device: torch.device, seed: int) -> nn.Module:
    """A GPT for training, wrapped by :func:`shard_model`, its weights from ``seed``.

    The model is built on the meta device (no memory), sharded, then materialised with ``to_empty`` and
    initialised by :meth:`GPT.init_weights`: under FSDP2 no rank ever holds the full fp32 model, only its
    shard plus one full parameter at a time. DDP and FSDP runs with the same seed start from identical
    weights. Requires an initialised process group.
    """
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

    A model on the meta device stays there (FSDP2 shards meta parameters; see :func:`build_sharded`)."""
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
