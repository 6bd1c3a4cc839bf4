"""A small decoder-only transformer (GPT-style) with an optional KV cache for incremental decoding.

Pre-norm blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP -> residual), learned
absolute positions, attention through ``torch.nn.functional.scaled_dot_product_attention``. Each
:class:`Block` is a separate module so that FSDP2 can shard the model block by block
(``aifactory.train.parallel``).

Incremental decoding::

    cache = model.new_kv_cache(batch_size=1)
    logits = model(prompt, kv_cache=cache, start_pos=0)             # prefill
    logits = model(next_token, kv_cache=cache, start_pos=prompt_len)  # one step

gives the same logits as one full forward over the concatenated sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aifactory.models.config import GPTConfig

__all__ = ["GPT", "GPTConfig", "KVCache", "load_gpt"]


@dataclass
class KVCache:
    """Preallocated keys and values per layer: ``(B, n_heads, max_len, head_dim)`` each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, *, cache: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        is_causal = t > 1
        if cache is not None:
            k_cache, v_cache = cache
            end = start_pos + t
            k_cache[:, :, start_pos:end] = k.to(k_cache.dtype)
            v_cache[:, :, start_pos:end] = v.to(v_cache.dtype)
            k, v = k_cache[:, :, :end].to(q.dtype), v_cache[:, :, :end].to(q.dtype)
            if start_pos > 0 and t > 1:
                # Query i sits at absolute position start_pos + i and may see keys 0..start_pos + i;
                # is_causal would align the mask to the top-left corner instead.
                rows = torch.arange(start_pos, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= rows
                is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """One pre-norm transformer block: the unit FSDP2 shards."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, *, cache=None, start_pos: int = 0):
        x = x + self.attn(self.ln1(x), cache=cache, start_pos=start_pos)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx (B, T) int64) -> logits (B, T, vocab_size)``."""

    def __init__(self, config: GPTConfig | dict):
        super().__init__()
        cfg = config if isinstance(config, GPTConfig) else GPTConfig.model_validate(config)
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.reset_parameters()

    def _init_rule(self, name: str, ndim: int) -> float | str:
        """GPT-2 initialisation of one parameter: ``"ones"``, ``"zeros"`` or the std of a zero-mean normal.

        LayerNorm weights start at 1 and biases at 0; residual projections are scaled by 1/sqrt(2 * n_layers)
        to keep the residual stream's variance."""
        if ndim == 1:
            return "ones" if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else "zeros"
        if name.endswith(("attn.proj.weight", "mlp.down.weight")):
            return 0.02 / math.sqrt(2 * self.config.n_layers)
        return 0.02

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation in place, drawn from the global RNG (see :meth:`init_weights` for sharded models)."""
        for name, p in self.named_parameters():
            _fill_(p, self._init_rule(name, p.dim()))

    @torch.no_grad()
    def init_weights(self, *, seed: int) -> None:
        """GPT-2 initialisation from ``seed`` alone, the same whatever the device, sharding or world size.

        Each parameter's *full* value is drawn on the CPU from one generator, parameter by parameter in
        ``named_parameters`` order, and copied into the parameter; an FSDP2 (DTensor) parameter takes only
        this rank's shard of it (no communication). So a model built on the meta device, sharded, then
        ``to_empty``-ed gets exactly the weights of an unsharded eager build with the same seed, while no
        rank ever holds more than one full parameter at a time (aifactory.models.build.build_sharded).
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            full = _fill_(torch.empty(tuple(p.shape), dtype=torch.float32), self._init_rule(name, p.dim()), gen)
            full = full.to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank holds the same full value, so each keeps its own chunk locally.
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
            else:
                p.copy_(full)

    def new_kv_cache(
        self, batch_size: int, *, max_len: int | None = None, device=None, dtype: torch.dtype | None = None
    ) -> KVCache:
        cfg = self.config
        max_len = max_len or cfg.seq_len
        if max_len > cfg.seq_len:
            raise ValueError(f"max_len ({max_len}) exceeds the model's seq_len ({cfg.seq_len})")
        ref = self.tok_emb.weight  # not head.weight: a quantized head (aifactory.models.quantized) has no weight tensor
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        mk = lambda: torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)  # noqa: E731
        return KVCache(keys=[mk() for _ in range(cfg.n_layers)], values=[mk() for _ in range(cfg.n_layers)])

    def forward(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        b, t = idx.shape
        limit = kv_cache.max_len if kv_cache is not None else self.config.seq_len
        if start_pos < 0 or start_pos + t > limit:
            raise ValueError(f"positions {start_pos}..{start_pos + t - 1} do not fit in {limit} (seq_len/cache length)")
        if kv_cache is None and start_pos:
            raise ValueError("start_pos needs a kv_cache (without one the sequence always starts at 0)")
        pos = torch.arange(start_pos, start_pos + t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            cache = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None else None
            x = block(x, cache=cache, start_pos=start_pos)
        return self._logits(self.ln_f(x))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's output as a tensor of its own, not a view.

        ``nn.Linear`` on a (B, T, d) input runs one ``addmm`` on a flattened view and returns a ``.view`` of its
        result, so the model's output was a view. FSDP2 hooks the root module's output for its backward
        all-gather and warns on every training step (torch/distributed/fsdp/_fully_shard/_fsdp_state.py,
        ``_register_pre_backward_hook``) that an in-place op on such a view would drop that hook. Nothing here
        modifies the logits in place (the loss reads them out of place), so gradients were right; but the output
        the training loop holds is now a tensor with no base, so no later in-place op can skip the all-gather:
        ``matmul`` of a 3-D input returns an unaliased result, and the bias is added out of place (same maths).
        A replaced head (a quantized variant's Linear has no weight tensor) is called as it is.
        """
        head = self.head
        if type(head) is not nn.Linear:
            return head(h)
        out = torch.matmul(h, head.weight.t())
        return out + head.bias if head.bias is not None else out

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by up to ``max_new_tokens`` (greedy when temperature is 0), with the KV cache."""
        b, t = idx.shape
        total = min(t + max_new_tokens, self.config.seq_len)
        cache = self.new_kv_cache(b, max_len=total, device=idx.device)
        logits = self(idx, kv_cache=cache, start_pos=0)[:, -1]
        out = [idx]
        for pos in range(t, total):
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits.float(), -1), 1, generator=generator)
            out.append(nxt)
            if pos + 1 < total:
                logits = self(nxt, kv_cache=cache, start_pos=pos)[:, -1]
        return torch.cat(out, dim=1)


def load_gpt(weights_path: str, model_config: dict, *, device: str = "cpu") -> GPT:
    """A :class:`GPT` with the consolidated weights of a registry version (``torch.save`` of a state_dict)."""
    model = GPT(GPTConfig.model_validate(model_config))
    state = torch.load(weights_path, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def _fill_(t: torch.Tensor, rule: str | float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one :meth:`GPT._init_rule` in place: "ones", "zeros", or a normal draw with that std."""
    if rule == "ones":
        return t.fill_(1.0)
    if rule == "zeros":
        return t.zero_()
    return t.normal_(mean=0.0, std=rule, generator=generator)
