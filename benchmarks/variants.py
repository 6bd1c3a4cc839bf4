"""Parent vs int8-dynamic vs distilled: throughput, p99 latency, memory, quality and cost, side by side in one run.

    .venv/bin/python -m benchmarks.variants [--parent NAME:VERSION] [--rounds 3] [--requests 32] [--max-tokens 32]

Without ``--parent`` it builds everything in a private loopback Ray cluster and factory home: ingests a small
corpus, trains the Linear-heavy ``bench_parent`` recipe (jobs/optimize_recipes.py, ~3.3M parameters, FSDP2 +
bf16), quantizes it (int8-dynamic, gated) and distills ``bench_student`` from it (gated). Then every variant
decodes the same prompts (validation rows) through the serving engine, one torch thread each (as one serving
replica), in interleaved rounds (aifactory.bench.variants). Quality is each one's validation loss on the
parent's validation split and its delta to the parent; cost per 1k requests prices the CPU-seconds with the
price book. Expected on CPU: int8 dynamic >= 1.5x the parent's throughput for Linear-heavy models.
Records through the measurement toolkit: benchmarks/results/variants/ (run.json with each variant's row and
the paired throughput ratio to the parent with its CI; trials.jsonl with every round, priced) and
variants.png.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", help="an existing parent NAME:VERSION in $AIFACTORY_HOME (skips the bootstrap)")
    p.add_argument("--quantized", help="an existing quantized variant NAME:VERSION (default: quantize now)")
    p.add_argument("--distilled", help="an existing distilled variant NAME:VERSION (default: distill now)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=32, help="requests per variant per round")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=32)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=32)
    p.add_argument("--train-steps", dest="train_steps", type=int, default=40)
    p.add_argument("--distill-steps", dest="distill_steps", type=int, default=30)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    started = time.time()

    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    root = Path(tempfile.mkdtemp(prefix="aif-bench-variants-"))
    if not args.parent:
        os.environ["AIFACTORY_HOME"] = str(root / "home")
    import torch

    from aifactory.cost.pricebook import load_price_book
    from aifactory.data.store import DatasetStore
    from aifactory.home import FactoryHome
    from aifactory.optimize.config import EvalSpec
    from aifactory.recipes import quantize_spec
    from aifactory.optimize.gate import eval_loss, load_registered, validation_batches
    from aifactory.bench.analysis import summarize_configs
    from aifactory.bench.context import collect_context
    from aifactory.bench.report import bar_chart
    from aifactory.bench.results import record_benchmark
    from aifactory.bench.stats import ratio_summary
    from aifactory.bench.variants import compare_variants, summarize
    from aifactory.optimize.quantize import run_quantize
    from aifactory.registry import ModelRegistry

    home = FactoryHome.from_env().ensure()
    registry = ModelRegistry(home)
    timings: dict[str, float] = {}
    parent_ref, quant_ref, dist_ref = args.parent, args.quantized, args.distilled
    if not (parent_ref and dist_ref):
        parent_ref, dist_ref = _bootstrap(home, root, args, parent_ref, timings)
    if not quant_ref:
        t0 = time.monotonic()
        quant_ref = run_quantize(home, parent_ref, quantize_spec("int8-dynamic", tenant="bench"), log=print)[0].ref
        timings["quantize_s"] = time.monotonic() - t0

    refs = {"parent": parent_ref, "int8-dynamic": quant_ref, "distilled": dist_ref}
    parent_mv = registry.get(*parent_ref.split(":"))
    version = DatasetStore(home).get(parent_mv.manifest["dataset_version"])
    batches = validation_batches(version, spec=EvalSpec(batch_size=16, max_batches=8))
    losses = {}
    for label, ref in refs.items():
        _, model = load_registered(registry, ref)
        losses[label] = eval_loss(model, batches, seq_len=64)
    rows_tokens = torch.cat(batches)[:, : args.prompt_tokens].tolist()
    prompts = [rows_tokens[i % len(rows_tokens)] for i in range(args.requests)]

    torch.set_num_threads(1)  # one serving replica per CPU (AIFACTORY_SERVE_TORCH_THREADS=1)
    t0 = time.monotonic()
    runs = compare_variants(home.registry, refs, prompts=prompts, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, rounds=args.rounds, log=print)
    timings["measure_s"] = time.monotonic() - t0
    book = load_price_book(home=home)
    rows = []
    for label, ref in refs.items():
        mv = registry.get(*ref.split(":"))
        quality = {"val_loss": losses[label], "quality_delta": losses[label] - losses["parent"],
                   "gate_quality_delta": (mv.manifest.get("variant") or {}).get("quality_delta")}
        rows.append({"label": label, **summarize(runs[label], mv=mv, quality=quality, book=book)})
    base = rows[0]
    for r in rows:
        r["throughput_vs_parent"] = r["throughput_rps"] / base["throughput_rps"]
        r["p99_vs_parent"] = r["p99_latency_s"] / base["p99_latency_s"]
        r["weights_vs_parent"] = r["weights_bytes"] / base["weights_bytes"]
    for r in rows:
        r["throughput_ratio_to_parent_paired"] = ratio_summary(
            runs[r["label"]].round_throughput_rps, runs["parent"].round_throughput_rps).to_dict()
    result = {
        "parent": parent_ref, "dataset_version": version.version,
        "workload": {"requests_per_round": args.requests, "rounds": args.rounds, "batch_size": args.batch_size,
                     "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "torch_threads": 1,
                     "greedy": True, "validation_batches": len(batches), "eval_seq_len": 64},
        "price_book": book.version, "variants": rows, "timings_s": timings,
        "expectation": {"int8_throughput_vs_parent_min": 1.5,
                        "met": rows[1]["throughput_vs_parent"] >= 1.5},
    }
    # One trial per variant and round: that round's throughput, its share of the CPU-seconds (priced).
    variants = {label: [{"throughput_rps": rps, "num_ok": len(prompts), "num_requests": len(prompts),
                         "replica_cpu_s": runs[label].cpu_s / len(runs[label].round_throughput_rps)}
                        for rps in runs[label].round_throughput_rps] for label in refs}
    _, trials, folder = record_benchmark(
        "variants", variants, out_dir=args.out, kind="serve-benchmark-variants", started_at=started, summary=result,
        context=collect_context(dataset_version=version.version, model_version=parent_ref,
                                flags={"quantized_engine": torch.backends.quantized.engine, "torch_threads": 1}),
        params=vars(args), knobs={label: {"model": ref} for label, ref in refs.items()})
    bar_chart(Path(args.out) / "variants.png", f"variants of {parent_ref} (1 thread, batch {args.batch_size}, "
              f"{args.max_tokens} new tokens)", summarize_configs(trials, family="serving"),
              [("throughput_rps", "throughput (req/s)"), ("cost_per_1k_requests_usd", "cost per 1k requests (USD)")])
    cols = ["label", "throughput_rps", "throughput_vs_parent", "p50_latency_s", "p99_latency_s", "weights_bytes",
            "val_loss", "quality_delta", "cost_per_1k_requests_usd"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))
    print(f"wrote {folder} and {Path(args.out) / 'variants.png'}")
    return 0


def _bootstrap(home, root: Path, args, parent_ref: str | None, timings: dict) -> tuple[str, str]:
    """Ingest, train the parent (unless given) and distill a student, on a private local Ray cluster."""
    import ray

    from aifactory.data.ingest import IngestConfig, ingest, local_writer
    from aifactory.recipes import student_spec
    from aifactory.optimize.distill import run_distillation
    from aifactory.tenancy import TenantRef
    from aifactory.recipes import load_recipe
    from aifactory.train.jobspec import apply_overrides
    from aifactory.train.runner import run_training

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 << 20,
             _temp_dir=str(root / "ray"), logging_level="WARNING", log_to_driver=False)
    try:
        if parent_ref is None:
            t0 = time.monotonic()
            data = ingest(home, IngestConfig(source=os.path.join(sysconfig.get_paths()["stdlib"], "email"), seq_len=65,
                                             target_shard_mb=0.1, validation_fraction=0.1),
                          tenant=TenantRef(tenant="bench"), writer=local_writer).version
            timings["ingest_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            job = apply_overrides(load_recipe("bench_parent"), dataset=data, max_steps=args.train_steps)
            out = run_training(job, home=home, log=print)
            timings["train_s"] = time.monotonic() - t0
            parent_ref = f"{out.model_name}:{out.model_version}"
        t0 = time.monotonic()
        spec = student_spec("bench_student", max_steps=args.distill_steps)
        mv, _, _ = run_distillation(home, parent_ref, spec, log=print)
        timings["distill_s"] = time.monotonic() - t0
    finally:
        ray.shutdown()
    return parent_ref, mv.ref


if __name__ == "__main__":
    raise SystemExit(main())
