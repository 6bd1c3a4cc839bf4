"""One tenant's request never fails another's: bounds checked before a batch, and per-row failures in it.

Requests of many tenants share one ``@serve.batch`` call. A probe found that a seed >= 2**64 or a temperature
of 1e-300 made the shared decode raise (every co-batched request answered 500), that a lone surrogate did
the same to the embeddings app, and that deep JSON or a lone surrogate in a prompt answered 500. These tests
hold the two defences: the parser refuses such input with a 4xx naming the field, and what still fails for
one row inside a batch fails that row only. No Ray: ``serve.batch`` runs in-process on asyncio.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from types import SimpleNamespace

import pytest

from aifactory.serve.batching import BatchLane, isolate_failures
from aifactory.serve.schemas import (
    MAX_JSON_DEPTH, APIError, CompletionRequest, EmbeddingRequest, json_depth, parse_body, read_body,
)

BASE = {"model": "m", "prompt": "x"}


def refused(model, raw: bytes, **kwargs) -> APIError:
    with pytest.raises(APIError) as exc:
        parse_body(model, raw, **kwargs)
    err = exc.value
    assert 400 <= err.status < 500
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")  # the error body itself always renders
    return err


# ---- every field bounded before it reaches a batch ------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("seed", 2**64),  # torch.Generator.manual_seed overflowed inside the shared decode
    ("seed", 2**63),
    ("seed", -1),
    ("seed", 1e20),
    ("temperature", 1e-300),  # logits / 1e-300 overflowed to inf and torch.multinomial raised
    ("temperature", 1e-4),
    ("temperature", 2.5),
    ("temperature", -0.5),
    ("top_p", 0),
    ("top_p", 1.5),
    ("max_tokens", 0),
    ("n", 2),
    ("stop", ["s"] * 5),
    ("stop", "s" * 129),
    ("stop", ["ok", "s" * 129]),
    ("model", "m" * 257),
    ("user", "u" * 257),
])
def test_out_of_range_completion_fields_are_400s_naming_the_field(field, value):
    err = refused(CompletionRequest, json.dumps(BASE | {field: value}).encode())
    assert err.status == 400 and err.param == field and field in err.message


@pytest.mark.parametrize("field,literal", [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN")])
def test_nan_and_infinity_are_refused_as_not_finite(field, literal):
    # Python's JSON parser accepts these literals; the answer should say what is wrong with them.
    raw = json.dumps(BASE)[:-1].encode() + f', "{field}": {literal}}}'.encode()
    err = refused(CompletionRequest, raw)
    assert err.param == field and "finite" in err.message


@pytest.mark.parametrize("fields", [
    {"seed": 0}, {"seed": 2**63 - 1}, {"temperature": 0}, {"temperature": 1e-3}, {"temperature": 2},
    {"stop": ["a", "b", "c", "d"]}, {"stop": "s" * 128}, {"top_p": 1},
])
def test_values_at_the_bounds_are_accepted(fields):
    req = parse_body(CompletionRequest, json.dumps(BASE | fields).encode())
    assert all(getattr(req, k) == v for k, v in fields.items())


# ---- the raw body: size, nesting, encoding -----------------------------------------------------------

def test_a_body_over_the_byte_limit_is_a_413_naming_the_body():
    raw = json.dumps(BASE | {"prompt": "x" * 5000}).encode()
    err = refused(CompletionRequest, raw, max_body_bytes=4096)
    assert err.status == 413 and err.param == "body" and "4096" in err.message
    assert parse_body(CompletionRequest, raw, max_body_bytes=len(raw)).prompt == "x" * 5000


def test_the_default_body_limits_hold_the_largest_request_the_other_limits_allow():
    from aifactory.serve.config import EmbeddingsArgs, Limits

    args = EmbeddingsArgs()
    raw = json.dumps({"model": args.model_id, "input": ["x" * args.max_input_chars] * args.max_inputs}).encode()
    assert len(parse_body(EmbeddingRequest, raw, max_body_bytes=args.max_body_bytes).inputs()) == args.max_inputs
    limits = Limits().fit(seq_len=1 << 16)  # token limits default from the model: the longest context GPTConfig allows
    prompt = "\u00e9" * limits.max_prompt_tokens  # the most bytes per token: \uXXXX escapes
    raw = json.dumps(BASE | {"prompt": prompt, "stop": ["s" * 128] * 4}).encode()
    assert parse_body(CompletionRequest, raw, max_body_bytes=limits.max_body_bytes).prompt == prompt


class FakeRequest:
    """What read_body uses of a Starlette request: the headers and the streamed body."""

    def __init__(self, chunks: list[bytes], content_length: int | None = None):
        self.headers = {} if content_length is None else {"content-length": str(content_length)}
        self.chunks = chunks
        self.read = 0

    async def stream(self):
        for c in self.chunks:
            self.read += 1
            yield c


def test_read_body_refuses_a_large_body_before_reading_it_all():
    declared = FakeRequest([b"x" * 100] * 10, content_length=1000)
    with pytest.raises(APIError) as exc:
        asyncio.run(read_body(declared, max_body_bytes=500))
    assert exc.value.status == 413 and exc.value.param == "body" and declared.read == 0

    undeclared = FakeRequest([b"x" * 100] * 10)  # chunked: no Content-Length to trust
    with pytest.raises(APIError) as exc:
        asyncio.run(read_body(undeclared, max_body_bytes=500))
    assert exc.value.status == 413 and undeclared.read == 6

    assert asyncio.run(read_body(FakeRequest([b"ab", b"cd"], content_length=4), max_body_bytes=4)) == b"abcd"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deeply_nested_json_is_a_400_before_the_parser_recurses(depth):
    # 100_000 levels made json.loads raise RecursionError: a 500.
    raw = json.dumps(BASE)[:-1].encode() + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"
    err = refused(CompletionRequest, raw)
    assert err.param == "body" and err.code == "json_too_deep"


def test_json_depth_counts_nesting_not_brackets_inside_strings():
    assert json_depth(b'{"a": [[1], {"b": [2]}]}', limit=0) == 4
    assert json_depth(b'[' * 40 + b']' * 40, limit=32) == 40
    assert json_depth(b'[[]]' * 40, limit=32) == 2  # many brackets, shallow
    tricky = json.dumps({"prompt": '[[[{{{ \\" [[[ "' * 50}).encode()  # brackets and escaped quotes in a string
    assert json_depth(tricky, limit=0) == 1
    assert parse_body(CompletionRequest, json.dumps(BASE | {"prompt": "[" * 1000}).encode()).prompt == "[" * 1000


def test_a_body_that_is_not_utf8_is_a_400():
    err = refused(CompletionRequest, b'{"model": "m", "prompt": "\xff"}')
    assert err.param == "body"
    # UTF-16 JSON (which json.loads would guess and accept) is refused too.
    assert refused(CompletionRequest, json.dumps(BASE).encode("utf-16")).param == "body"


@pytest.mark.parametrize("model,raw,param", [
    (CompletionRequest, b'{"model": "m", "prompt": "hi \\ud800 there"}', "prompt"),
    (CompletionRequest, b'{"model": "m", "prompt": ["\\udfff"]}', "prompt"),
    (CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ["ok", "\\ud83d"]}', "stop"),
    (CompletionRequest, b'{"model": "m\\udc00", "prompt": "x"}', "model"),
    (EmbeddingRequest, b'{"model": "e", "input": "\\ud800"}', "input"),
    (EmbeddingRequest, b'{"model": "e", "input": ["fine", "also fine", "x\\udbff"]}', "input"),
])
def test_lone_surrogates_are_400s_naming_the_field(model, raw, param):
    err = refused(model, raw)
    assert err.status == 400 and err.param == param and err.code == "invalid_unicode"


def test_a_lone_surrogate_in_a_field_name_is_a_400_whose_body_still_encodes():
    err = refused(CompletionRequest, b'{"model": "m", "prompt": "x", "\\ud800": 1}')
    assert err.param == "\\ud800"  # shown escaped, so the UTF-8 body can hold it


def test_surrogate_pairs_and_escaped_backslashes_are_valid_text():
    req = parse_body(CompletionRequest, b'{"model": "m", "prompt": "\\ud83d\\ude00 \\\\ud800"}')
    assert req.prompt == "\U0001F600 \\ud800"
    assert parse_body(EmbeddingRequest, b'{"model": "e", "input": ["\\ud83d\\ude00"]}').inputs() == ["\U0001F600"]


# ---- a poisoned row fails alone inside a batch --------------------------------------------------------

@pytest.fixture(scope="module")
def loaded():
    import torch

    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.serve.engine import LoadedModel

    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    return LoadedModel("m", "v1", "0" * 64, GPT(cfg).eval(), cfg.seq_len, 0.0)


def good_items():
    from aifactory.serve.engine import GenItem

    return [GenItem(tokens=list(b"abc"), max_tokens=5), GenItem(tokens=list(b"abd"), max_tokens=4, temperature=0.8,
                                                                  seed=7)]


def poisoned_items():
    """Rows that bypassed validation, each failing in a different place of the engine (all of prompt length 3,
    so they share the good rows' length group, KV cache and decode steps)."""
    from aifactory.serve.engine import GenItem

    return [GenItem(tokens=list(b"xyz"), max_tokens=5, temperature=1.0, seed=2**64),  # its generator
            GenItem(tokens=list(b"xyz"), max_tokens=5, temperature=1e-300, seed=1),  # its sampling
            GenItem(tokens=[1, 2, 10**6], max_tokens=5)]  # its prefill


def test_the_engine_fails_only_the_poisoned_rows(loaded):
    from aifactory.serve.engine import Decoder

    alone = Decoder(loaded).generate(good_items())
    good, bad = good_items(), poisoned_items()
    batch = [bad[0], good[0], bad[1], bad[2], good[1]]
    results = Decoder(loaded).generate(batch)
    assert [r.error is None for r in results] == [False, True, False, False, True]
    assert "Overflow" in results[0].error and "probability" in results[2].error and "index" in results[3].error
    assert all(r.finish_reason == "error" for r in (results[0], results[2], results[3]))
    # The good rows decoded in the same group answer exactly what they answer on their own.
    assert [results[1].tokens, results[4].tokens] == [a.tokens for a in alone]
    assert results[1].timings["batch_rows"] == 5


def test_a_poisoned_row_ends_its_stream_with_one_error_delta(loaded):
    from aifactory.serve.engine import Decoder

    steps = list(Decoder(loaded).stream([poisoned_items()[2], good_items()[0]]))
    bad = [s[0] for s in steps if s[0] is not None]
    assert len(bad) == 1 and bad[0].result.error is not None and bad[0].tokens == []
    assert steps[0][0] is bad[0]  # a prefill failure is reported in the first step, not never
    good = [s[1] for s in steps if s[1] is not None]
    assert len(good) == 5 and good[-1].result.error is None


def test_a_group_of_only_poisoned_rows_answers_each_with_its_error(loaded):
    from aifactory.serve.engine import Decoder

    results = Decoder(loaded).generate(poisoned_items())
    assert all(r.error is not None and r.tokens == [] for r in results)


@pytest.fixture
def model_server(loaded, monkeypatch):
    """The completions app's ModelServer (``engine: static``) around the tiny GPT, its ``@serve.batch`` running
    in-process."""
    import ray.serve.batching

    from aifactory.serve.apps import completions
    from aifactory.serve.engine import Decoder
    from aifactory.serve.metrics import LatencyWindow

    # The batch queue reads the replica's max_ongoing_requests only to log a warning; there is no replica here.
    monkeypatch.setattr(ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    server = object.__new__(completions.ModelServer.func_or_class)
    server.loaded, server.decoder, server.prefix_cache = loaded, Decoder(loaded), None
    server.latency = LatencyWindow()
    server.loop = None  # engine: static (the continuous engine's row isolation is tests/unit/test_serve_engine_cb.py)
    return server


def test_co_batched_requests_of_the_completions_app_survive_a_poisoned_one(model_server):
    good, bad = good_items(), poisoned_items()

    async def collect(item):
        return [d async for d in model_server.stream(item)]

    async def main():
        answers = await asyncio.gather(model_server.generate(good[0]), model_server.generate(bad[0]),
                                       model_server.generate(good[1]), return_exceptions=True)
        streams = await asyncio.gather(collect(bad[1]), collect(good[0]), return_exceptions=True)
        await asyncio.sleep(0.05)  # let the drained streams end
        return answers, streams

    (a, poisoned, b), (poisoned_stream, stream) = asyncio.run(main())
    assert a.error is None and b.error is None and a.timings["batch_rows"] == 3  # one batch held all three
    for err in (poisoned, poisoned_stream):
        assert isinstance(err, APIError) and err.status == 500 and err.code == "generation_failed"
    assert stream[-1].result.tokens == a.tokens


class FakeEncoder:
    """Stands in for MiniLM: like its fast tokenizer, it raises on text that is not valid Unicode."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts, **kwargs):
        self.calls.append(list(texts))
        for t in texts:
            t.encode("utf-8")
        return [[float(len(t))] for t in texts]

    def tokenize(self, text):
        return text.split()


def test_an_encode_call_that_fails_fails_only_the_request_holding_the_bad_text():
    from aifactory.serve.apps import embeddings

    # The app's own methods on a stand-in self: an instance of the ingress-wrapped class needs a replica.
    cls, encoder = embeddings.Embeddings.func_or_class, FakeEncoder()
    server = SimpleNamespace(model=encoder, tokenizer=encoder)
    server._encode_texts = partial(cls._encode_texts, server)
    lane = BatchLane(partial(cls._encode, server), max_items=64)

    async def main():
        futures = [lane.submit(["a b"]), lane.submit(["fine", "\ud800"]), lane.submit(["c d e"])]
        return await asyncio.gather(*futures, return_exceptions=True)

    first, poisoned, last = asyncio.run(main())
    assert encoder.calls[0] == ["a b", "fine", "\ud800", "c d e"]  # one call held all three requests
    assert first == [([3.0], 4)] and last == [([5.0], 5)]
    assert isinstance(poisoned, APIError) and poisoned.status == 500 and poisoned.code == "encoding_failed"


def test_isolate_failures_finds_the_failing_items_in_few_calls():
    calls = []

    def fn(items):
        calls.append(len(items))
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [2 * x for x in items]

    items = list(range(64))
    items[37] = -1
    out = isolate_failures(fn, items)
    assert isinstance(out[37], ValueError)
    assert [o for i, o in enumerate(out) if i != 37] == [2 * x for i, x in enumerate(items) if i != 37]
    assert len(calls) <= 1 + 2 * 6  # a binary search: two calls per level of 64 -> 1
    calls.clear()
    assert isolate_failures(fn, [1, 2]) == [2, 4] and calls == [2]  # no failure, no extra call


def test_a_lane_fails_only_the_request_whose_output_is_an_error():
    def fn(items):
        return [ValueError(f"bad {x}") if x == 13 else x for x in items]

    async def main():
        lane = BatchLane(fn, max_items=8)
        return await asyncio.gather(lane.submit([1]), lane.submit([2, 13]), lane.submit([3]),
                                    return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert (a, c) == ([1], [3])
    assert isinstance(bad, ValueError) and "13" in str(bad)
