"""GPU check: the factory's own training path (Ray Train, NCCL, FSDP2, bf16-mixed) on every visible GPU.

    .venv/bin/python -m benchmarks.gpu_check [--steps 20] [--recipe tiny] [--cpu]

Starts a private loopback Ray cluster with the machine's GPUs and a throwaway factory home, ingests a small
corpus with the data plane, and trains the recipe through ``run_training`` (the front door, one Ray Train
worker per GPU, ``use_gpu`` on, FSDP2 + bf16-mixed), as ``factory train`` would. Everything it prints is
what the run measured and reported per rank: the process-group backend, the dtype the first linear layer's
weight had *inside forward* and the dtype its matmul produced (``aifactory.train.parallel.ComputeDtypeProbe``;
the stored shards stay fp32), steady-state tokens/s, MFU against the device's peak, peak memory, the
validation loss. It passes when every rank ran on CUDA with NCCL, computed in bf16 with fp32 shards, and the
run ended with a finite loss. Where no CUDA GPU is present it says so and exits 0; ``--cpu`` runs the same
path on CPU workers (gloo) to check the script itself on a machine without one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import tempfile
from pathlib import Path


def check(metrics: dict, *, want_cuda: bool) -> list[str]:
    """What failed, per rank (empty: passed)."""
    problems = []
    ranks = metrics.get("per_worker") or []
    if not ranks:
        problems.append("the run reported no per-rank figures")
    for w in ranks:
        r = w.get("rank")
        if want_cuda and metrics.get("backend") != "nccl":
            problems.append(f"rank {r}: backend {metrics.get('backend')!r}, expected nccl")
        if w.get("compute_param_dtype") != "bfloat16" or w.get("compute_output_dtype") != "bfloat16":
            problems.append(f"rank {r}: computed in {w.get('compute_param_dtype')}/{w.get('compute_output_dtype')}, "
                            "expected bfloat16 (FSDP2 MixedPrecisionPolicy)")
        if w.get("stored_param_dtype") != "float32":
            problems.append(f"rank {r}: shards stored in {w.get('stored_param_dtype')}, expected float32")
    loss = metrics.get("val_loss")
    if not isinstance(loss, float) or not math.isfinite(loss):
        problems.append(f"validation loss {loss!r} is not a finite number")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--cpu", action="store_true", help="no GPU: run the same path on 2 CPU workers (gloo)")
    args = p.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.cpu:
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check, exiting 0")
        return 0
    workers = gpus or 2
    root = Path(tempfile.mkdtemp(prefix="aif-gpu-check-"))
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                      AIFACTORY_HOME=str(root / "home"))
    import ray

    from aifactory.data.ingest import IngestConfig, ingest, local_writer
    from aifactory.home import FactoryHome
    from aifactory.recipes import load_recipe
    from aifactory.tenancy import TenantRef
    from aifactory.train.jobspec import apply_overrides
    from aifactory.train.runner import run_training

    home = FactoryHome.from_env().ensure()
    ray.init(address="local", num_cpus=workers + 2, num_gpus=gpus, include_dashboard=False,
             object_store_memory=512 << 20, _temp_dir=str(root / "ray"), logging_level="WARNING", log_to_driver=False)
    try:
        data = ingest(home, IngestConfig(source=os.path.join(sysconfig.get_paths()["stdlib"], "email"), seq_len=129,
                                         target_shard_mb=0.1, validation_fraction=0.1),
                      tenant=TenantRef(tenant="gpu-check"), writer=local_writer).version
        job = apply_overrides(load_recipe(args.recipe), dataset=data, max_steps=args.steps, workers=workers,
                              tenant="gpu-check")
        job = job.model_copy(update={
            "sharding": "fsdp", "precision": "bf16-mixed",
            "scaling": job.scaling.model_copy(update={"use_gpu": bool(gpus)}),
            "validation": job.validation.model_copy(update={"register_validated": False}),
        })
        print(f"gpu_check: {args.recipe} ({job.model.gpt.num_params() / 1e6:.1f}M params), {workers} "
              f"{'GPU' if gpus else 'CPU'} worker(s), {args.steps} steps, FSDP2 + bf16-mixed", flush=True)
        out = run_training(job, home=home)
    finally:
        ray.shutdown()
    m = out.metrics
    ranks = [{k: w.get(k) for k in ("rank", "compute_param_dtype", "compute_output_dtype", "stored_param_dtype",
                                    "tokens_per_s", "mfu", "peak_memory_bytes", "peak_memory_method")}
             for w in m.get("per_worker") or []]
    print(json.dumps({"backend": m.get("backend"), "device": m.get("device"), "world_size": m.get("world_size"),
                      "tokens_per_s": m.get("tokens_per_s"), "mfu": m.get("mfu"),
                      "mfu_peak_source": m.get("mfu_peak_source"), "val_loss": m.get("val_loss"),
                      "run_id": out.run_id, "ranks": ranks}, indent=2, default=str))
    problems = check(m, want_cuda=bool(gpus))
    for line in problems:
        print(f"gpu_check: {line}")
    print("gpu_check: OK" if not problems else "gpu_check: FAILED")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
