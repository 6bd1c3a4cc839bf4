"""Dynamic batching on vs off: the same MiniLM embeddings app, the same bounded load, interleaved.

    .venv/bin/python -m benchmarks.serve_batching [--ingress haproxy|python|both] [--repeats 3]

Two copies of serve_apps/embeddings are deployed side by side on a private loopback cluster: one with
``@serve.batch`` (max_batch_size 64, 10 ms window) and one with max_batch_size 1 (batching off). A
closed loop of ``--concurrency`` clients (past the unbatched saturation point) sends one sentence per
request; variants alternate round by round and the medians of ``--repeats`` rounds are reported.
Target: batched throughput >= 3x unbatched, with batched p99 no worse than unbatched p99.
Records through the measurement toolkit (:mod:`aifactory.bench`): benchmarks/results/serve_batching/
(run.json with the paired throughput ratio and its CI per ingress, trials.jsonl with every round, priced;
``factory bench report|compare`` read it) and serve_batching.png beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from aifactory.bench.analysis import summarize_configs
from aifactory.bench.context import collect_context
from aifactory.bench.loadgen import closed_loop
from aifactory.bench.report import bar_chart
from aifactory.bench.results import interleaved, record_benchmark
from aifactory.bench.stats import medians, ratio_summary
from aifactory.serve.benchmarking import prepare_auth, private_cluster
from aifactory.serve.config import AutoscalingSpec, BatchingConfig, EmbeddingsArgs

RESULTS = Path(__file__).parent / "results"
REPLICA_CPUS = 0.5
SENTENCES = [
    "how do I reverse a list in python", "the build failed with a missing header", "deploy the model to production",
    "what is the capital of france", "a cat sat on the warm mat", "quarterly revenue grew by ten percent",
    "the train leaves at seven in the morning", "resize the image to 224 by 224 pixels",
]


def _args(max_batch_size: int) -> EmbeddingsArgs:
    return EmbeddingsArgs(
        batching=BatchingConfig(max_batch_size=max_batch_size, batch_wait_timeout_s=0.01),
        max_ongoing_requests=256, max_queued_requests=1024, num_cpus=REPLICA_CPUS,
        autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=1, slo_aware=False),
    )


def run_ingress(ingress: str, *, concurrency: int, requests: int, repeats: int) -> dict:
    from ray import serve

    from aifactory.serve.apps.embeddings import app_builder

    with private_cluster(ingress=ingress) as c:
        print(f"[{ingress}] cluster up in {c['start_s']:.1f}s; deploying both variants ...", flush=True)
        serve.run(app_builder(_args(64)), name="batched", route_prefix="/batched")
        serve.run(app_builder(_args(1)), name="unbatched", route_prefix="/unbatched")
        base = f"http://127.0.0.1:{c['port']}"

        def body(i: int) -> dict:
            return {"model": "all-MiniLM-L6-v2", "input": f"{SENTENCES[i % len(SENTENCES)]} #{i}"}

        def load(prefix: str, n: int):
            def run() -> dict:
                m = asyncio.run(closed_loop(f"{base}/{prefix}/v1/embeddings", body, concurrency=concurrency,
                                            total=n, headers={"X-Tenant": "bench"})).metrics()
                return m | {"replica_cpu_s": REPLICA_CPUS * m["wall_s"]}  # one replica held while measured
            return run

        # Warm both: every new (batch, length) shape costs oneDNN a kernel build the first time, so the
        # batched copy needs a few hundred requests before its rounds measure steady state.
        for prefix in ("batched", "unbatched"):
            load(prefix, max(2 * concurrency, requests // 2))()
        runs = interleaved({"batching on": load("batched", requests), "batching off": load("unbatched", requests)},
                           repeats=repeats)
    med = {k: medians(v) for k, v in runs.items()}
    on, off = med["batching on"], med["batching off"]
    ratio = ratio_summary([r["throughput_rps"] for r in runs["batching on"]],
                          [r["throughput_rps"] for r in runs["batching off"]])
    p99 = ratio_summary([r["p99_ms"] for r in runs["batching on"]], [r["p99_ms"] for r in runs["batching off"]])
    return {
        "ingress": ingress, "runs": runs, "median": med,
        "throughput_ratio": ratio.to_dict(), "p99_ratio_on_over_off": p99.to_dict(),
        "target_met": (ratio.median or 0) >= 3 and on["p99_ms"] <= off["p99_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ingress", choices=("haproxy", "python", "both"), default="both")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=600, help="requests per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    started = time.time()
    prepare_auth()  # before Ray is imported: Ray reads its auth settings once per process
    ingresses = ["haproxy", "python"] if a.ingress == "both" else [a.ingress]
    variants: dict[str, list[dict]] = {}
    summary: dict = {"model": "all-MiniLM-L6-v2 (384-d) via serve_apps/embeddings", "inputs_per_request": 1,
                     "target": "batched throughput >= 3x unbatched (median of the paired ratios), p99 no worse",
                     "by_ingress": {}}
    for ing in ingresses:
        try:
            r = run_ingress(ing, concurrency=a.concurrency, requests=a.requests, repeats=a.repeats)
        except Exception as err:  # report a failed ingress (e.g. HAProxy ports taken) instead of dropping it
            summary["by_ingress"][ing] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{ing}] FAILED: {err}", flush=True)
            continue
        for v, runs in r.pop("runs").items():
            variants[f"{ing}/{v.replace(' ', '-')}"] = runs
        summary["by_ingress"][ing] = r
    if not variants:
        print("no ingress measured anything; nothing recorded")
        return 1
    run, trials, folder = record_benchmark(
        "serve_batching", variants, out_dir=a.out, kind="serve-benchmark-batching", started_at=started,
        context=collect_context(model_version="all-MiniLM-L6-v2"), summary=summary,
        params=vars(a) | {"load": "closed loop", "replica_num_cpus": REPLICA_CPUS},
        knobs={k: {"ingress": k.split("/")[0], "max_batch_size": 64 if k.endswith("on") else 1} for k in variants})
    bar_chart(Path(a.out) / "serve_batching.png", f"MiniLM embeddings, batching on vs off (concurrency {a.concurrency})",
              summarize_configs(trials, family="serving"),
              [("throughput_rps", "throughput (req/s)"), ("p50_ms", "p50 (ms)"), ("p99_ms", "p99 (ms)")])
    for ing, r in summary["by_ingress"].items():
        if "median" in r:
            on, off, ratio = r["median"]["batching on"], r["median"]["batching off"], r["throughput_ratio"]
            print(f"[{ing}] on: {on['throughput_rps']:.0f} rps p50 {on['p50_ms']:.0f} p95 {on['p95_ms']:.0f} "
                  f"p99 {on['p99_ms']:.0f} ms | off: {off['throughput_rps']:.0f} rps p50 {off['p50_ms']:.0f} "
                  f"p95 {off['p95_ms']:.0f} p99 {off['p99_ms']:.0f} ms | x{ratio['median']:.2f} "
                  f"[{ratio['ci_low'] or 0:.2f}, {ratio['ci_high'] or 0:.2f}] target "
                  f"{'met' if r['target_met'] else 'NOT met'}")
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
