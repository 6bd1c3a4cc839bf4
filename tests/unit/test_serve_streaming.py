"""Streaming without Ray: the engine's per-step deltas and the text the SSE chunks carry."""

from __future__ import annotations

import json
import random

import pytest

from aifactory.serve.streaming import TextStream, sse_chunk, stop_scan


def _stream_text(token_steps: list[list[int]], stops: list[str]) -> tuple[str, list[str], bool]:
    ts = TextStream(stops)
    pieces = []
    for i, step in enumerate(token_steps):
        piece = ts.feed(step, final=i == len(token_steps) - 1)
        if piece:
            pieces.append(piece)
        if ts.stopped:
            break
    return "".join(pieces), pieces, ts.stopped


def _whole(tokens: list[int], stops: list[str]) -> str:
    """What the non-streamed path answers (completions._apply_stop over the whole decoded text)."""
    text = bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def test_multibyte_characters_split_across_steps_decode_like_the_whole():
    tokens = list("naïve → ok ✓".encode())
    text, pieces, _ = _stream_text([[t] for t in tokens], [])
    assert text == "naïve → ok ✓" and len(pieces) > 5
    assert all("\ufffd" not in p for p in pieces)  # a half character is held back, never sent broken


def test_invalid_utf8_and_special_tokens_match_the_whole_decode():
    tokens = [0xE2, 0x82, ord("a"), 0xFF, 257, ord("b"), 0xC3]  # truncated sequences, an EOS id, a dangling lead
    text, _, _ = _stream_text([[t] for t in tokens], [])
    assert text == _whole(tokens, [])


def test_stop_sequences_are_held_back_and_cut_like_the_whole():
    tokens = list(b"print(x)\n\nEND here")
    text, pieces, stopped = _stream_text([[t] for t in tokens], ["\n\n"])
    assert stopped and text == "print(x)" == _whole(tokens, ["\n\n"])
    assert "\n" not in "".join(pieces)


def test_the_earliest_stop_wins_even_if_a_later_starting_one_completes_first():
    # "c" completes at index 2 before "abcd" does, but "abcd" starts at 0: the whole answer cuts at 0.
    assert stop_scan("xabc", ["abcd", "c"], final=False) == (1, False)
    text, _, stopped = _stream_text([[t] for t in b"xabcd!"], ["abcd", "c"])
    assert (text, stopped) == ("x", True)


@pytest.mark.parametrize("seed", range(30))
def test_random_streams_equal_the_whole_answer(seed):
    rng = random.Random(seed)
    alphabet = list(b"ab\n") + [0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF]
    tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 40))]
    stops = rng.choice([[], ["\n"], ["ab", "b\n"], ["\u00e9a", "aaa"], ["\u20ac"]])
    steps, i = [], 0
    while i < len(tokens):  # a step may carry 0..2 tokens
        n = rng.randint(0, 2)
        steps.append(tokens[i:i + n])
        i += n
    steps.append([])
    text, _, _ = _stream_text(steps, stops)
    assert text == _whole(tokens, stops)


def test_sse_chunk_is_openai_shaped():
    line = sse_chunk({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}, "hi")
    assert line.startswith("data: ") and line.endswith("\n\n")
    body = json.loads(line[len("data: "):])
    assert body["choices"] == [{"text": "hi", "index": 0, "logprobs": None, "finish_reason": None}]
    assert "usage" not in body


def test_engine_streams_one_delta_per_step_and_generate_matches():
    import torch

    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.serve.engine import Decoder, GenItem, LoadedModel

    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    loaded = LoadedModel("m", "v1", "0" * 64, GPT(cfg).eval(), cfg.seq_len, 0.0)
    items = [GenItem(tokens=list(b"abc"), max_tokens=5), GenItem(tokens=list(b"hello"), max_tokens=3),
             GenItem(tokens=list(b"xyz"), max_tokens=2, temperature=0.8, seed=3)]
    steps = list(Decoder(loaded).stream(items))
    assert all(len(s) == 3 for s in steps)
    for r, it in enumerate(items):
        deltas = [s[r] for s in steps if s[r] is not None]
        assert all(d.result is None for d in deltas[:-1]) and deltas[-1].result is not None
        assert all(len(d.tokens) <= 1 for d in deltas)
        assert [t for d in deltas for t in d.tokens] == deltas[-1].result.tokens
        if deltas[-1].result.finish_reason == "length":
            assert len(deltas) == it.max_tokens  # one chunk per decoded token
    # Length groups decode one after the other: "hello" (its own group) waits while "abc"/"xyz" decode.
    assert steps[0][1] is None and steps[0][0] is not None
    whole = Decoder(loaded).generate(items)
    streamed = [next(s[r] for s in steps if s[r] is not None and s[r].result is not None).result for r in range(3)]
    assert [w.tokens for w in whole] == [s.tokens for s in streamed]
