"""A block-paged KV cache and a ragged forward of :class:`~aifactory.models.gpt.GPT`: many sequences, each
at its own position, in one model call.

Why: :meth:`GPT.forward` takes one ``start_pos`` for the whole batch, so rows of one call must sit at the same
position (the static engine groups prompts by exact length for that). Iteration-level batching
(:mod:`aifactory.serve.engine_cb`) runs, in one step, one decode token of every running sequence and a chunk
of some prompts, all at different positions. Here the step's tokens are packed into one flat ``(N,)`` row:
every position-wise part of the model (embeddings, LayerNorms, the qkv/out projections, the MLPs, the head)
runs once over all ``N`` tokens, with no padding; only attention looks at sequences one by one, reading each
one's keys and values from the blocks it owns in a shared pool (vLLM's paged attention, in plain PyTorch so
the same code runs on CPU and CUDA):

- the pool of each layer is ``(num_blocks, block_tokens, n_heads, head_dim)``; a sequence's position ``p``
  lives in block ``block_ids[p // block_tokens]`` at offset ``p % block_tokens``;
- all single-token queries of a step (decodes) attend in one batched call over their gathered blocks,
  masked to each row's length; each longer chunk (a prefill) attends on its own, causally from its offset.

:func:`ragged_forward` mirrors :class:`~aifactory.models.gpt.Block`'s residual structure (pre-norm attention,
then MLP) and must stay in step with it; ``tests/unit/test_serve_engine_cb.py`` checks its logits against
:meth:`GPT.forward`. Dropout is not applied (serving runs the model in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PagedKVCache", "RaggedBatch", "SeqChunk", "ragged_forward"]


@dataclass
class PagedKVCache:
    """Keys and values of every layer in blocks: ``(num_blocks, block_tokens, n_heads, head_dim)`` each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]

    @property
    def block_tokens(self) -> int:
        return self.keys[0].shape[1]

    @classmethod
    def for_model(cls, model, *, num_blocks: int, block_tokens: int, device=None,
                  dtype: torch.dtype | None = None) -> PagedKVCache:
        cfg = model.config
        ref = model.tok_emb.weight  # not head.weight: a quantized head has no weight tensor
        shape = (num_blocks, block_tokens, cfg.n_heads, cfg.head_dim)
        mk = lambda: torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)
        return cls(keys=[mk() for _ in range(cfg.n_layers)], values=[mk() for _ in range(cfg.n_layers)])


@dataclass
class SeqChunk:
    """One sequence's part of a step: ``num_tokens`` new tokens at ``tokens[offset:offset + num_tokens]`` of the
    packed batch, at positions ``start_pos ..``; it reads and writes KV in ``block_ids`` (its block table)."""

    offset: int
    num_tokens: int
    start_pos: int
    block_ids: list[int]

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass
class RaggedBatch:
    """The tokens of one step, packed: ``tokens``/``positions``/``slots`` are ``(N,)``; ``logits_at`` are the
    packed indices whose next-token logits the caller wants (each sequence's last token, when it samples)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor  # flat KV slot of each token: block_id * block_tokens + offset in the block
    chunks: list[SeqChunk]
    logits_at: torch.Tensor

    @classmethod
    def build(cls, chunks: list[tuple[list[int], int, list[int]]], *, block_tokens: int, logits_at: list[int],
              device=None) -> RaggedBatch:
        """From ``(new_tokens, start_pos, block_ids)`` per sequence; ``logits_at`` indexes ``chunks``: the last
        token of each listed sequence gets logits."""
        toks: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        out: list[SeqChunk] = []
        for new, start, blocks in chunks:
            out.append(SeqChunk(len(toks), len(new), start, list(blocks)))
            toks.extend(new)
            for p in range(start, start + len(new)):
                pos.append(p)
                slots.append(blocks[p // block_tokens] * block_tokens + p % block_tokens)
        last = [out[i].offset + out[i].num_tokens - 1 for i in logits_at]
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
        return cls(t(toks), t(pos), t(slots), out, t(last))


@torch.no_grad()
def ragged_forward(model, batch: RaggedBatch, cache: PagedKVCache) -> torch.Tensor:
    """Run one step: write every new token's keys and values into ``cache`` and return the logits
    ``(len(batch.logits_at), vocab_size)`` of the requested positions."""
    x = model.tok_emb(batch.tokens) + model.pos_emb(batch.positions)  # (N, d)
    singles = [c for c in batch.chunks if c.num_tokens == 1]
    plan = _DecodePlan.build(singles, block_tokens=cache.block_tokens, device=x.device) if singles else None
    for i, block in enumerate(model.blocks):
        x = x + _attention(block.attn, block.ln1(x), batch, cache.keys[i], cache.values[i], plan)
        x = x + block.mlp(block.ln2(x))
    h = model.ln_f(x.index_select(0, batch.logits_at))
    return model._logits(h)


@dataclass
class _DecodePlan:
    """The gather indices and mask of one step's single-token queries, shared by every layer."""

    rows: torch.Tensor  # packed indices of the single-token queries (B,)
    table: torch.Tensor  # (B, max_blocks) block ids, padded with block 0 (masked out)
    mask: torch.Tensor  # (B, 1, 1, max_blocks * block_tokens): key position < the row's context length

    @classmethod
    def build(cls, singles: list[SeqChunk], *, block_tokens: int, device) -> _DecodePlan:
        width = max(-(-c.context_len // block_tokens) for c in singles)
        table = [c.block_ids[:width] + [0] * (width - min(width, len(c.block_ids))) for c in singles]
        lens = torch.tensor([c.context_len for c in singles], device=device)
        keys = torch.arange(width * block_tokens, device=device)
        return cls(torch.tensor([c.offset for c in singles], dtype=torch.long, device=device),
                   torch.tensor(table, dtype=torch.long, device=device),
                   (keys[None, :] < lens[:, None])[:, None, None, :])


def _attention(attn, h: torch.Tensor, batch: RaggedBatch, k_pool: torch.Tensor, v_pool: torch.Tensor,
               plan: _DecodePlan | None) -> torch.Tensor:
    n = h.shape[0]
    nh, hd = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(h).view(n, 3, nh, hd).unbind(1)  # (N, H, D) each, as GPT's view(b, t, 3, H, D)
    k_pool.view(-1, nh, hd).index_copy_(0, batch.slots, k.to(k_pool.dtype))
    v_pool.view(-1, nh, hd).index_copy_(0, batch.slots, v.to(v_pool.dtype))
    y = torch.empty(n, nh, hd, device=h.device, dtype=q.dtype)
    if plan is not None:
        b = plan.table.shape[0]
        # (B, blocks, block_tokens, H, D) -> (B, H, L, D)
        flat = plan.table.view(-1)
        kk = k_pool.index_select(0, flat).view(b, -1, nh, hd).transpose(1, 2).to(q.dtype)
        vv = v_pool.index_select(0, flat).view(b, -1, nh, hd).transpose(1, 2).to(q.dtype)
        qq = q.index_select(0, plan.rows)[:, :, None, :]  # (B, H, 1, D)
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=plan.mask)
        y.index_copy_(0, plan.rows, out[:, :, 0, :])
    for c in batch.chunks:
        if c.num_tokens == 1:
            continue
        end = c.context_len
        blocks = torch.tensor(c.block_ids[:-(-end // k_pool.shape[1])], dtype=torch.long, device=h.device)
        kk = k_pool.index_select(0, blocks).view(-1, nh, hd)[:end].transpose(0, 1)[None].to(q.dtype)  # (1, H, end, D)
        vv = v_pool.index_select(0, blocks).view(-1, nh, hd)[:end].transpose(0, 1)[None].to(q.dtype)
        qq = q[c.offset:c.offset + c.num_tokens].transpose(0, 1)[None]  # (1, H, t, D)
        if c.start_pos == 0:
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        else:
            # Query i sits at position start_pos + i and sees keys 0..start_pos + i (as GPT's cached forward).
            rows = torch.arange(c.start_pos, end, device=h.device)[:, None]
            mask = torch.arange(end, device=h.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        y[c.offset:c.offset + c.num_tokens] = out[0].transpose(0, 1)
    return attn.proj(y.reshape(n, nh * hd))
