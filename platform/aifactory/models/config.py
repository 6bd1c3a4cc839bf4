"""The shape of a GPT, without torch: configs validate (CLI, HTTP, Ray Train's boundary) before torch loads.

Re-exported as ``aifactory.models.gpt.GPTConfig``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from aifactory.config import StrictModel


class GPTConfig(StrictModel):
    """Shape of a :class:`GPT`. The defaults are the tiny model that trains in minutes on 2 CPU cores."""

    vocab_size: int = Field(default=259, ge=2, description="Token ids are 0..vocab_size-1 (259 for the byte tokenizer).")
    seq_len: int = Field(default=128, ge=1, le=1 << 16, description="Longest sequence (positions) the model handles.")
    d_model: int = Field(default=128, ge=8, description="Width of the residual stream.")
    n_layers: int = Field(default=2, ge=1, le=256, description="Number of transformer blocks.")
    n_heads: int = Field(default=4, ge=1, description="Attention heads per block; must divide d_model.")
    d_ff: int = Field(default=512, ge=8, description="Hidden width of each block's MLP.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on attention and residual branches.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}); "
                f"e.g. n_heads={_largest_divisor(self.d_model, self.n_heads)}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count, computed from the shape (matches ``sum(p.numel())`` of :class:`GPT`)."""
        d, f = self.d_model, self.d_ff
        per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        n = self.n_layers * per_block + 2 * d + (self.vocab_size * d + self.vocab_size)
        if embeddings:
            n += self.vocab_size * d + self.seq_len * d
        return n

    def train_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 * non-embedding params + attention.

        The PaLM appendix B estimate: ``6N + 12 * n_layers * d_model * seq_len`` (the attention score and
        value products, forward and backward). Used for MFU.
        """
        t = seq_len or self.seq_len
        return 6.0 * self.num_params(embeddings=False) + 12.0 * self.n_layers * self.d_model * t


def _largest_divisor(n: int, at_most: int) -> int:
    return max(k for k in range(1, min(n, at_most) + 1) if n % k == 0)
