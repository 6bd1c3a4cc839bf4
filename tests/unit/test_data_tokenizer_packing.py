"""Byte tokenizer, packing and the deterministic document split (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from aifactory.data.packing import count_tokens, pack_documents, split_of, token_histogram
from aifactory.data.tokenizer import BOS, EOS, PAD, ByteTokenizer


def test_tokenizer_contract_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, BOS, EOS, PAD) == (259, 256, 257, 258)
    text = "déjà vu — 日本語\n\tdef f(): return 1"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text
    assert tok.decode([PAD, *tok.encode("ab"), PAD]) == "ab"
    assert tok.encode("x") == [ord("x")]


def test_decode_replaces_invalid_utf8():
    assert ByteTokenizer().decode([0xE6, 0x97]) == "\ufffd"  # a truncated multi-byte char from a model


def test_packing_fills_rows_and_pads_only_the_tail():
    texts = ["hello world", "second doc", "x" * 40]
    rows = pack_documents(texts, seq_len=16)
    stream = [t for text in texts for t in ByteTokenizer().encode(text, bos=True, eos=True)]
    assert rows.dtype == np.uint16 and rows.shape == (-(-len(stream) // 16), 16)
    flat = rows.reshape(-1).tolist()
    assert flat[: len(stream)] == stream
    assert set(flat[len(stream):]) <= {PAD} and PAD not in flat[: len(stream)]
    assert count_tokens(rows) == len(stream)
    hist = token_histogram(rows, 259)
    assert hist.sum() == rows.size and hist[BOS] == 3 and hist[EOS] == 3


def test_packing_rejects_tiny_seq_len_and_handles_empty():
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(["a"], seq_len=1)
    assert pack_documents([], seq_len=8).shape == (0, 8)


def test_split_is_deterministic_by_document_and_seed():
    ids = [f"pkg/mod_{i}.py" for i in range(2000)]
    a = [split_of(d, validation_fraction=0.1, seed=0) for d in ids]
    assert a == [split_of(d, validation_fraction=0.1, seed=0) for d in reversed(ids)][::-1]  # order-free
    frac = a.count("validation") / len(a)
    assert 0.07 < frac < 0.13
    b = [split_of(d, validation_fraction=0.1, seed=1) for d in ids]
    assert a != b  # the seed matters
    assert all(split_of(d, validation_fraction=0.0) == "train" for d in ids[:50])
    with pytest.raises(ValueError):
        split_of("x", validation_fraction=1.0)
