"""Packing documents into fixed-length training rows, and the deterministic train/validation split.

Each document becomes ``BOS + bytes + EOS``; documents are concatenated into one stream and cut into rows
of ``seq_len`` tokens (a model predicts ``row[1:]`` from ``row[:-1]``). Only the stream's last, partial
row is padded with ``PAD``, so padding costs at most one row per packing call.

The split is by document, never by row: all rows of a document land in the same split, so validation
never sees text that training saw. A document's split is a pure function of its id and the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from aifactory.data.tokenizer import PAD, ByteTokenizer

SPLITS = ("train", "validation")


def split_of(doc_id: str, *, validation_fraction: float, seed: int = 0) -> str:
    """``"train"`` or ``"validation"`` for a document, stable across runs, machines and file order."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "train"


def pack_documents(texts: Iterable[str], *, seq_len: int, tokenizer: ByteTokenizer | None = None) -> np.ndarray:
    """``(rows, seq_len) uint16`` rows packed from ``texts`` in order; the last row is padded."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a row holds inputs and next-token targets), got {seq_len}")
    tok = tokenizer or ByteTokenizer()
    parts = [np.asarray(tok.encode(t, bos=True, eos=True), dtype=np.uint16) for t in texts]
    if not parts:
        return np.zeros((0, seq_len), dtype=np.uint16)
    stream = np.concatenate(parts)
    rows = -(-len(stream) // seq_len)
    out = np.full(rows * seq_len, PAD, dtype=np.uint16)
    out[: len(stream)] = stream
    return out.reshape(rows, seq_len)


def count_tokens(rows: np.ndarray) -> int:
    """Real (non-padding) tokens in packed rows."""
    return int(np.count_nonzero(rows != PAD))


def token_histogram(rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """Counts of each token id (length ``vocab_size``), the basis of the token-distribution drift bound."""
    return np.bincount(rows.reshape(-1).astype(np.int64), minlength=vocab_size)[:vocab_size]
