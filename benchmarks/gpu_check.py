"""GPU check: NCCL collectives and an FSDP2 + bf16-mixed training step on every visible GPU.

    .venv/bin/python -m benchmarks.gpu_check [--steps 20]

Spawns one process per GPU (torch.multiprocessing, NCCL, no Ray needed), shards a small GPT with the
factory's own ``shard_model`` under bf16-mixed, checks an all-reduce result, trains ``--steps`` steps on
random tokens, and prints loss, tokens/s, peak memory and MFU per rank as JSON. Where no CUDA GPU is
present it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _worker(rank: int, world: int, port: int, steps: int, q) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from aifactory.models.gpt import GPTConfig
    from aifactory.train.metrics import mfu, peak_flops
    from aifactory.models.build import build_sharded
    from aifactory.train.parallel import current_device

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = current_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev.device)
    t = torch.full((4,), float(rank + 1), device=dev.device)
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    allreduce_ok = bool(torch.allclose(t, torch.full_like(t, expected)))

    cfg = GPTConfig(seq_len=512, d_model=1024, n_layers=12, n_heads=16, d_ff=4096)
    torch.manual_seed(0)
    # The training loop's path: meta-device build, FSDP2 shards, to_empty on the GPU, seeded shard-wise init.
    model = build_sharded(cfg, sharding="fsdp", precision="bf16-mixed", device=dev.device, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator(device="cpu").manual_seed(rank)
    batch = 16
    tokens = torch.randint(0, 256, (batch, cfg.seq_len + 1), generator=gen).to(dev.device)
    losses, t0 = [], None
    for step in range(steps):
        if step == 3:  # after warm-up (NCCL communicators, kernels)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    tps = (steps - 3) * batch * cfg.seq_len / (time.perf_counter() - t0)
    peak = peak_flops(dev.name, "bf16-mixed")
    q.put({
        "rank": rank, "device": dev.name, "backend": dist.get_backend(), "allreduce_ok": allreduce_ok,
        "param_dtype_in_compute": "bfloat16", "first_loss": losses[0], "last_loss": losses[-1],
        "tokens_per_s": tps, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mfu": mfu(tokens_per_s=tps, flops_per_token=cfg.train_flops_per_token(), peak=peak.flops),
        "mfu_peak_source": peak.source,
    })
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check, exiting 0")
        return 0
    import socket

    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args.steps, q)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    results = sorted((q.get() for _ in range(sum(proc.exitcode == 0 for proc in procs))), key=lambda r: r["rank"])
    print(json.dumps({"world_size": world, "ranks": results}, indent=2))
    ok = len(results) == world and all(r["allreduce_ok"] and r["last_loss"] < r["first_loss"] for r in results)
    print("gpu_check: OK" if ok else "gpu_check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
