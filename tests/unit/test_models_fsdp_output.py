"""The GPT's output under FSDP2 is a tensor of its own, not a view, so FSDP2's backward hook on it is safe.

FSDP2 registers its pre-backward hook (the backward all-gather) on the root module's output and warns when
that output is a view: an in-place op on it would drop the hook. ``nn.Linear`` over a (B, T, d) input returns
a view, which made every training step of ``make run`` warn (issue 21). One gloo rank in this process, no Ray.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from aifactory.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=259, seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
def test_fsdp2_training_step_returns_no_view_and_warns_nothing(one_rank, precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Sharded as training shards it: per block, then the root, bf16 compute with fp32 reduction.
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
        if precision == "bf16-mixed" else {}
    torch.manual_seed(3)
    model = GPT(CFG)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    x = torch.randint(0, 256, (2, CFG.seq_len))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), x.reshape(-1))
        loss.backward()
    assert logits._base is None, "the model's output is a view: FSDP2's pre-backward hook on it is fragile"
    views = [str(w.message) for w in caught if "view tensor" in str(w.message)]
    assert not views, views
    assert all(p.grad is not None for p in model.parameters())


def test_head_without_addmm_gives_the_linear_layers_logits():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    x = torch.randint(0, 256, (3, CFG.seq_len))
    h = torch.randn(3, CFG.seq_len, CFG.d_model)
    assert torch.allclose(model._logits(h), model.head(h), atol=1e-6)
    with torch.no_grad():
        assert model(x).shape == (3, CFG.seq_len, CFG.vocab_size)
