"""The compute dtype under each sharding and precision, measured inside forward (``ComputeDtypeProbe``), on a
one-process gloo group on CPU: FSDP2's mixed-precision policy really runs the blocks in bf16 while the stored
shards stay fp32; DDP + bf16-mixed computes in bf16 through autocast with fp32 weights; fp32 is fp32. The
training loop reports these figures per rank, and the GPU check prints them (benchmarks/gpu_check.py)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from aifactory.models.build import build_sharded
from aifactory.models.config import GPTConfig
from aifactory.train.parallel import ComputeDtypeProbe, autocast_context


@pytest.fixture(scope="module")
def gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("sharding,precision,param,output", [
    ("fsdp", "bf16-mixed", "bfloat16", "bfloat16"),
    ("fsdp", "fp32", "float32", "float32"),
    ("ddp", "bf16-mixed", "float32", "bfloat16"),
    ("ddp", "fp32", "float32", "float32"),
])
def test_forward_computes_in_the_dtype_the_policy_promises(gloo, sharding, precision, param, output):
    cfg = GPTConfig(seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    device = torch.device("cpu")
    model = build_sharded(cfg, sharding=sharding, precision=precision, device=device, seed=0)
    probe = ComputeDtypeProbe(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with autocast_context(sharding=sharding, precision=precision, device=device):
        model(tokens)
    assert probe.summary() == {"compute_param_dtype": param, "compute_output_dtype": output,
                                    "stored_param_dtype": "float32"}
