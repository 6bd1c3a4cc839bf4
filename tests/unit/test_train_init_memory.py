"""Meta-device build + FSDP2 sharding starts from the eager build's exact weights; the training-memory meter.

The sharded case runs two real gloo processes on 127.0.0.1 (torch.multiprocessing, no Ray).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from aifactory.models.gpt import GPT, GPTConfig
from aifactory.train.metrics import TrainingPeakMemory, rss_bytes

# Odd sizes so that Shard(0) chunks are uneven (FSDP2 pads the last rank's shard).
CFG = GPTConfig(vocab_size=259, seq_len=16, d_model=24, n_layers=3, n_heads=4, d_ff=40)


def _eager(seed: int) -> dict[str, torch.Tensor]:
    model = GPT(CFG)
    model.init_weights(seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_init_weights_depends_on_the_seed_alone():
    torch.manual_seed(123)
    a = _eager(5)
    torch.manual_seed(456)  # the global RNG plays no part
    b = _eager(5)
    c = _eager(6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    # The GPT-2 rules hold: LayerNorm weights 1, biases 0, residual projections scaled down.
    assert torch.equal(a["blocks.1.ln2.weight"], torch.ones(CFG.d_model))
    assert torch.equal(a["head.bias"], torch.zeros(CFG.vocab_size))
    assert a["blocks.0.mlp.down.weight"].std() < a["blocks.0.mlp.up.weight"].std()


def _sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from aifactory.train.checkpoint import consolidated_model_state
    from aifactory.models.build import build_sharded

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for sharding in ("fsdp", "ddp"):  # one process group for both: process start-up is the slow part
            model = build_sharded(CFG, sharding=sharding, precision="bf16-mixed", device=torch.device("cpu"), seed=5)
            assert not any(p.is_meta for p in model.parameters())
            if sharding == "fsdp":
                local = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
                assert local < CFG.num_params()  # each rank holds a shard, not the model
            full = consolidated_model_state(model)
            if rank == 0:
                torch.save(full, os.path.join(out_dir, f"{sharding}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meta_build_sharded_on_two_ranks_equals_eager_init(tmp_path):
    mp.start_processes(_sharded_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    want = _eager(5)
    for sharding in ("fsdp", "ddp"):
        got = torch.load(tmp_path / f"{sharding}.pt", weights_only=True)
        got = {k.removeprefix("module."): v for k, v in got.items()}  # DDP's wrapper prefix
        assert got.keys() == want.keys(), sharding
        for k in want:
            assert torch.equal(got[k], want[k]), (sharding, k)


def test_training_peak_memory_counts_the_window_not_setup():
    meter = TrainingPeakMemory("cpu", sample_s=0.001)
    base = meter.baseline()
    setup = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched during setup, then freed
    del setup
    meter.start()
    assert meter.method  # says which measurement it used
    block = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB touched during the window, still held
    peak = meter.peak()
    assert peak >= rss_bytes() - (1 << 20)
    assert meter.above_baseline() >= 28 << 20
    del block
    # The 64 MiB setup transient is not in the window's peak (the kernel mark was reset at start()); without the
    # reset the window would read at least 64 MiB above the baseline.
    if meter.method.startswith("VmHWM"):
        assert meter.above_baseline() < 56 << 20
        assert meter.setup_peak_bytes >= base + (60 << 20)  # the setup peak does hold the transient


def test_pin_cpu_malloc_threshold_on_glibc():
    import platform

    from aifactory.train.parallel import pin_cpu_malloc_threshold

    assert pin_cpu_malloc_threshold() is (platform.libc_ver()[0] == "glibc")
