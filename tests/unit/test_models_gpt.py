"""GPT shapes, config validation, and KV-cache decoding equal to the full forward."""

import pytest
import torch

from aifactory.config import parse_config
from aifactory.exceptions import ConfigError
from aifactory.models.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=259, seq_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def test_forward_shape_and_param_count():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 259, (3, 17))
    assert model(idx).shape == (3, 17, 259)
    assert sum(p.numel() for p in model.parameters()) == TINY.num_params()


def test_config_rejects_heads_not_dividing_width_and_names_fields():
    with pytest.raises(ConfigError) as err:
        parse_config(GPTConfig, {"d_model": 30, "n_heads": 4}, source="model")
    assert "n_heads (4) must divide d_model (30)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(GPTConfig, {"dropout": 1.5, "n_layers": 0, "bogus": 1}, source="model")
    assert len(err.value.problems) == 3


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        GPT(TINY)(torch.zeros(1, 33, dtype=torch.long))


def test_kv_cache_prefill_and_steps_match_full_forward():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 259, (2, 20))
    full = model(idx)
    cache = model.new_kv_cache(2)
    parts = [model(idx[:, :7], kv_cache=cache, start_pos=0)]
    parts.append(model(idx[:, 7:12], kv_cache=cache, start_pos=7))  # a multi-token chunk after a prefix
    for pos in range(12, 20):
        parts.append(model(idx[:, pos : pos + 1], kv_cache=cache, start_pos=pos))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_greedy_generate_matches_recomputing_without_cache():
    torch.manual_seed(1)
    model = GPT(TINY).eval()
    prompt = torch.randint(0, 259, (1, 5))
    out = model.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_flops_per_token_counts_attention():
    cfg = TINY
    assert cfg.train_flops_per_token() == 6 * cfg.num_params(embeddings=False) + 12 * 2 * 32 * 32
