"""The continuous-batching engine without Ray: token-identical to decoding alone, priority, isolation."""

from __future__ import annotations

import random

import pytest
from aifactory.serve.config import ContinuousBatchingConfig

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def loaded():
    from aifactory.data.tokenizer import EOS
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.serve.engine import LoadedModel

    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.head.bias[EOS] -= 3.0  # a random model ends most answers at once otherwise; some still stop early
    return LoadedModel("m", "v1", "0" * 64, model, cfg.seq_len, 0.0)


def mixed_items(n: int = 10, seed: int = 1, **kw):
    """Prompts of 1..40 tokens and answers of 1..30 (some reach seq_len 64: finish 'length' at the context)."""
    from aifactory.serve.engine import GenItem

    rng = random.Random(seed)
    return [GenItem(tokens=[rng.randrange(256) for _ in range(rng.randint(1, 40))], max_tokens=rng.randint(1, 30),
                    **kw) for _ in range(n)]


def alone(loaded, items):
    """Each request decoded on its own by the static engine (its batch is itself)."""
    from aifactory.serve.engine import Decoder

    return [Decoder(loaded).generate([it])[0] for it in items]


def engine(loaded, **cfg):
    from aifactory.serve.engine_cb import ContinuousEngine

    return ContinuousEngine(loaded, config=ContinuousBatchingConfig(**cfg))


def answers(results):
    return [(r.tokens, r.finish_reason, r.error) for r in results]


@pytest.fixture(scope="module")
def reference(loaded):
    items = mixed_items()
    return items, answers(alone(loaded, items))


# ---- the model's ragged forward ------------------------------------------------------------------------

def test_ragged_forward_matches_the_models_own_forward(loaded):
    """Sequences at different positions, some chunks continuing a cached prefix, in one call: each sequence's
    logits equal a full forward over its tokens."""
    from aifactory.models.paged import PagedKVCache, RaggedBatch, ragged_forward

    model = loaded.model
    rng = random.Random(0)
    seqs = [[rng.randrange(256) for _ in range(n)] for n in (9, 1, 23, 5)]
    cache = PagedKVCache.for_model(model, num_blocks=16, block_tokens=4)
    blocks = [[3, 0, 7], [5], [1, 2, 4, 6, 8, 9], [10, 11]]
    done = [0, 0, 17, 3]  # the third and fourth already have part of their KV state (a previous step's chunk)
    first = [(s[:d], 0, b) for s, d, b in zip(seqs, done, blocks) if d]
    ragged_forward(model, RaggedBatch.build(first, block_tokens=4, logits_at=[]), cache)
    step = [(s[d:], d, b) for s, d, b in zip(seqs, done, blocks)]
    got = ragged_forward(model, RaggedBatch.build(step, block_tokens=4, logits_at=[0, 1, 2, 3]), cache)
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- greedy outputs are token-identical to decoding each request alone ----------------------------------

def test_mixed_prompt_lengths_in_one_batch_answer_as_alone(loaded, reference):
    items, want = reference
    eng = engine(loaded, max_num_seqs=16, max_tokens_per_step=1024)
    assert answers(eng.generate(items)) == want
    assert eng.stats.largest_batch == len(items)  # all of them decoded together, at different positions
    assert eng.stats.preemptions == 0


def test_chunked_prefill_answers_as_alone(loaded, reference):
    items, want = reference
    eng = engine(loaded, max_num_seqs=4, max_tokens_per_step=6, kv_block_tokens=4)
    assert max(len(it.tokens) for it in items) > 6  # so some prompts were prefilled over several steps
    assert answers(eng.generate(items)) == want


def test_preemption_by_recompute_answers_as_alone(loaded, reference):
    items, want = reference
    # 20 blocks of 4 = 80 positions for up to 8 sequences of up to 64: they run out, sequences are recomputed.
    eng = engine(loaded, max_num_seqs=8, max_tokens_per_step=16, kv_block_tokens=4, kv_blocks=20)
    assert answers(eng.generate(items)) == want
    assert eng.stats.preemptions > 0


def test_decodes_keep_going_while_a_long_prompt_prefills_in_chunks(loaded):
    from aifactory.serve.engine import GenItem

    eng = engine(loaded, max_num_seqs=4, max_tokens_per_step=8, kv_block_tokens=4)
    short = eng.add(GenItem(tokens=[1, 2, 3], max_tokens=20))
    eng.step()  # its prefill (3 tokens) and first token
    long = eng.add(GenItem(tokens=list(range(60)), max_tokens=2))
    steps = [eng.step() for _ in range(10)]
    assert all(short in s for s in steps)  # a token every step: 60 prompt tokens never stalled it
    # 7 tokens a step are left for the prefill: 8 steps of 7, then the last 4 and its first token.
    assert next(i for i, s in enumerate(steps) if long in s) == 8


# ---- sampling ---------------------------------------------------------------------------------------------

def test_seeded_sampling_does_not_depend_on_the_batch(loaded):
    from aifactory.serve.engine import GenItem

    rng = random.Random(5)
    items = [GenItem(tokens=[rng.randrange(256) for _ in range(rng.randint(2, 30))], max_tokens=20,
                     temperature=0.9, seed=100 + i) for i in range(6)]
    solo = [answers(engine(loaded).generate([it]))[0] for it in items]
    with_greedy_neighbours = items + mixed_items(6, seed=9)
    batched = answers(engine(loaded, max_num_seqs=6, max_tokens_per_step=10, kv_block_tokens=4, kv_blocks=24)
                      .generate(with_greedy_neighbours))[:6]
    assert batched == solo
    assert solo == answers(alone(loaded, items))  # and what the static engine answers for the same seed


# ---- priority inside the engine ---------------------------------------------------------------------------

def test_interactive_requests_are_admitted_before_batch_ones(loaded):
    from aifactory.serve.engine import GenItem

    eng = engine(loaded, max_num_seqs=2, max_tokens_per_step=64)
    for _ in range(3):
        eng.add(GenItem(tokens=[7] * 5, max_tokens=5, slo_class="batch"))
    inter = [eng.add(GenItem(tokens=[9] * 5, max_tokens=5, slo_class="interactive")) for _ in range(2)]
    first = eng.step()
    assert set(first) == set(inter)  # they arrived last and still took both rows


def test_an_interactive_request_preempts_a_running_batch_one(loaded):
    from aifactory.serve.engine import GenItem

    items = [GenItem(tokens=[7, 8, 9], max_tokens=12, slo_class="batch") for _ in range(2)]
    want = answers(alone(loaded, items))
    eng = engine(loaded, max_num_seqs=2, max_tokens_per_step=64)
    ids = [eng.add(it) for it in items]
    eng.step()
    eng.step()
    late = eng.add(GenItem(tokens=[1, 2, 3, 4], max_tokens=3, slo_class="interactive"))
    assert late in eng.step()  # it got a row at once: the newest batch sequence was preempted for it
    assert eng.stats.preemptions == 1
    results = {}
    while eng.has_work:
        results.update({k: d.result for k, d in eng.step().items() if d.result is not None})
    assert answers([results[i] for i in ids]) == want  # the preempted one was recomputed, same answer
    assert results[ids[1]].timings["preemptions"] == 1


def test_without_priority_preemption_the_interactive_request_waits(loaded):
    from aifactory.serve.engine import GenItem

    eng = engine(loaded, max_num_seqs=2, max_tokens_per_step=64, priority_preemption=False)
    for _ in range(2):
        eng.add(GenItem(tokens=[7, 8, 9], max_tokens=12, slo_class="batch"))
    eng.step()
    late = eng.add(GenItem(tokens=[1, 2, 3, 4], max_tokens=3, slo_class="interactive"))
    assert late not in eng.step() and eng.stats.preemptions == 0


# ---- isolation ----------------------------------------------------------------------------------------------

def test_a_failing_row_fails_its_request_only(loaded):
    from aifactory.serve.engine import GenItem

    good = mixed_items(4, seed=3)
    bad = [GenItem(tokens=list(b"xyz"), max_tokens=5, temperature=1.0, seed=2**64),  # its generator
           GenItem(tokens=list(b"xyz"), max_tokens=5, temperature=1e-300, seed=1),  # its sampling
           GenItem(tokens=[1, 2, 10**6], max_tokens=5)]  # its tokens
    batch = [bad[0], good[0], bad[1], good[1], bad[2], good[2], good[3]]
    results = engine(loaded, max_num_seqs=8, max_tokens_per_step=16).generate(batch)
    assert [r.error is None for r in results] == [False, True, False, True, False, True, True]
    assert "Overflow" in results[0].error and "probability" in results[2].error and "range" in results[4].error
    assert all(results[i].finish_reason == "error" for i in (0, 2, 4))
    assert answers([results[i] for i in (1, 3, 5, 6)]) == answers(alone(loaded, good))


def test_a_failed_model_call_fails_that_steps_requests_and_the_engine_goes_on(loaded, monkeypatch):
    from aifactory.models import paged
    from aifactory.serve.engine import GenItem

    eng = engine(loaded)
    first = eng.add(GenItem(tokens=[1, 2], max_tokens=3))
    real = paged.ragged_forward
    monkeypatch.setattr(paged, "ragged_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    assert eng.step()[first].result.error == "RuntimeError: oom"
    monkeypatch.setattr(paged, "ragged_forward", real)
    item = GenItem(tokens=[4, 5, 6], max_tokens=4)
    assert answers(eng.generate([item])) == answers(alone(loaded, [item]))
    assert eng.scheduler.blocks_in_use == 0  # the failed request's blocks went back to the pool


def test_streaming_callbacks_get_each_token_then_the_result(loaded):
    items = mixed_items(3, seed=4)
    eng = engine(loaded)
    seen: dict[int, list] = {}
    for i, it in enumerate(items):
        eng.add(it, on_delta=lambda d, i=i: seen.setdefault(i, []).append(d))
    while eng.has_work:
        eng.step()
    for i, want in enumerate(alone(loaded, items)):
        deltas = seen[i]
        assert all(d.result is None for d in deltas[:-1]) and deltas[-1].result is not None
        assert [t for d in deltas for t in d.tokens] == deltas[-1].result.tokens == want.tokens


# ---- configuration ----------------------------------------------------------------------------------------

def test_config_refuses_a_step_budget_that_cannot_hold_every_decode():
    with pytest.raises(ValueError, match=r"max_tokens_per_step \(4\) < max_num_seqs \(8\)"):
        ContinuousBatchingConfig(max_num_seqs=8, max_tokens_per_step=4)


def test_too_few_kv_blocks_for_one_full_sequence_is_a_config_error(loaded):
    from aifactory.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"kv_blocks \(3\) x kv_block_tokens \(16\).*seq_len \(64\).*at least 4"):
        engine(loaded, kv_blocks=3)


# ---- the prefix cache ------------------------------------------------------------------------------------

def _prefix_items(tenant: str, n: int = 3):
    """Prompts sharing one 40-token system prompt (two 16-token blocks are cacheable), each its own question."""
    from aifactory.serve.engine import GenItem

    rng = random.Random(7)
    system = [rng.randrange(256) for _ in range(40)]
    return [GenItem(tokens=system + [rng.randrange(256) for _ in range(5)], max_tokens=8, tenant=tenant)
            for _ in range(n)]


def test_prefix_cache_hits_answer_as_alone_and_are_scoped_per_tenant(loaded):
    """A later request of the same tenant reuses the cached system prompt (and answers exactly as decoded alone);
    another tenant with the very same prompt never hits it."""
    from aifactory.serve.cache import PrefixCache
    from aifactory.serve.engine_cb import ContinuousEngine

    cache = PrefixCache(max_entries=16, block_tokens=16)
    eng = ContinuousEngine(loaded, config=ContinuousBatchingConfig(max_num_seqs=4, max_tokens_per_step=24),
                           prefix_cache=cache)
    a = _prefix_items("tenant-a")
    first = eng.generate(a[:1])  # stores the 32- and 16-token prefixes under tenant-a
    later = eng.generate(a[1:])
    assert [r.prefix_hit_tokens for r in first + later] == [0, 32, 32]
    assert answers(first + later) == answers(alone(loaded, a))
    b = _prefix_items("tenant-b")
    other = eng.generate(b[1:2])
    assert other[0].prefix_hit_tokens == 0  # tenant-a's prefix is not tenant-b's
    assert cache.stats.hits.get("tenant-b", 0) == 0 and cache.stats.hits["tenant-a"] == 2
    assert answers(other) == answers(alone(loaded, b[1:2]))


def test_a_preempted_request_with_a_prefix_hit_recomputes_and_answers_as_alone(loaded):
    from aifactory.serve.cache import PrefixCache
    from aifactory.serve.engine_cb import ContinuousEngine

    cache = PrefixCache(max_entries=16, block_tokens=16)
    # 6 blocks of 16: two 45-token prompts fit (3 blocks each) until they grow into a fourth, then one is preempted.
    eng = ContinuousEngine(loaded, config=ContinuousBatchingConfig(
        max_num_seqs=3, max_tokens_per_step=64, kv_block_tokens=16, kv_blocks=6), prefix_cache=cache)
    items = _prefix_items("t", n=3)
    items = [i.__class__(tokens=i.tokens, max_tokens=16, tenant="t") for i in items]
    eng.generate(items[:1])
    results = eng.generate(items[1:])
    assert eng.stats.preemptions > 0
    assert answers(results) == answers(alone(loaded, items[1:]))
