"""Overload with admission control: p99 of admitted requests at 2x saturating load vs at 0.8x.

    .venv/bin/python -m benchmarks.serve_overload [--ingress haproxy|python] [--repeats 2]

The batched MiniLM embeddings app runs with a bounded queue (max_ongoing_requests + max_queued_requests;
excess answered 429 + Retry-After by Serve). First a closed loop measures the saturation throughput S;
then open-loop (fixed-rate) loads of 0.8 S and 2 S alternate. Target: p99 of admitted requests at 2 S
at most 2x the p99 at 0.8 S, and the excess rejected quickly. Writes benchmarks/results/serve_overload.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aifactory.serve.benchmarking import (
    bar_chart, context, interleaved, medians, prepare_auth, private_cluster, write_results,
)
from aifactory.serve.config import AutoscalingSpec, BatchingConfig, EmbeddingsArgs
from aifactory.serve.loadgen import closed_loop, open_loop

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ingress", choices=("haproxy", "python"), default="haproxy")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per open-loop run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-ongoing", type=int, default=32)
    p.add_argument("--max-queued", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    prepare_auth()  # before Ray is imported: Ray reads its auth settings once per process
    from ray import serve

    from aifactory.serve.apps.embeddings import app_builder

    args = EmbeddingsArgs(
        batching=BatchingConfig(max_batch_size=32, batch_wait_timeout_s=0.01),
        max_ongoing_requests=a.max_ongoing, max_queued_requests=a.max_queued, retry_after_s=1, num_cpus=0.5,
        autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=1, slo_aware=False),
    )
    with private_cluster(ingress=a.ingress) as c:
        serve.run(app_builder(args), name="embeddings", route_prefix="/embeddings")
        url = f"http://127.0.0.1:{c['port']}/embeddings/v1/embeddings"

        def body(i: int) -> dict:
            return {"model": "all-MiniLM-L6-v2", "input": f"request number {i} about serving under load"}

        asyncio.run(closed_loop(url, body, concurrency=32, total=200))  # warm-up
        sat = asyncio.run(closed_loop(url, body, concurrency=a.max_ongoing, total=800)).summary()
        s_rps = sat["throughput_rps"]
        print(f"saturation: {s_rps:.0f} rps (closed loop, concurrency {a.max_ongoing})", flush=True)

        def at(factor: float):
            return lambda: asyncio.run(open_loop(url, body, rate_rps=factor * s_rps, duration_s=a.duration,
                                                 max_in_flight=1024)).summary()

        runs = interleaved({"0.8x": at(0.8), "2x": at(2.0)}, repeats=a.repeats)
    med = {k: medians(v) for k, v in runs.items()}
    low, high = med["0.8x"], med["2x"]
    result = {
        "benchmark": "serve_overload", "ingress": a.ingress, "context": context(),
        "admission": {"max_ongoing_requests": a.max_ongoing, "max_queued_requests": a.max_queued,
                      "rejection": "429 + Retry-After (Serve BackpressureConfig)"},
        "saturation": sat, "runs": runs, "median": med,
        "p99_ratio_2x_over_0_8x": high["p99_ms"] / low["p99_ms"],
        "rejected_fraction_2x": high["rejected"] / max(1, high["requests"]),
        "target_met": high["p99_ms"] <= 2 * low["p99_ms"],
    }
    path = write_results("serve_overload", result, out_dir=a.out)
    bar_chart(Path(a.out) / "serve_overload.png", f"Overload with admission control ({a.ingress} ingress)",
              {"0.8x saturation": low, "2x saturation": high},
              [("throughput_rps", "admitted throughput (req/s)"), ("p99_ms", "p99 of admitted (ms)"),
               ("rejected", "rejected (429) per run")])
    print(f"0.8x: p99 {low['p99_ms']:.0f} ms, rejected {low['rejected']:.0f} | 2x: p99 {high['p99_ms']:.0f} ms, "
          f"rejected {high['rejected']:.0f} of {high['requests']:.0f} (reject p99 {high.get('reject_p99_ms') or 0:.0f} ms)"
          f" | ratio {result['p99_ratio_2x_over_0_8x']:.2f} target {'met' if result['target_met'] else 'NOT met'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
