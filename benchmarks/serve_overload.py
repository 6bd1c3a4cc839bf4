"""Overload with admission control: p99 of admitted requests at 2x saturating load vs at 0.8x.

    flock /tmp/aifactory-bench.lock .venv/bin/python -m benchmarks.serve_overload [--ingress haproxy|python]

The batched MiniLM embeddings app runs with a bounded queue (max_ongoing_requests + max_queued_requests;
excess answered 429 + Retry-After by Serve). Saturation S is calibrated with the same open-loop generator
the comparison uses (32 closed-loop clients send in bursts that fill batches, so they overstate what
steady arrivals get): rates rise from a fraction of the closed-loop estimate until a point no longer runs
below saturation (rejections, the generator or the server falling behind the offered rate, the admission
bound filled, or the median latency growing over the run; see
``aifactory.bench.loadgen.below_saturation``). With ``--admission sized`` (default) the bound on
requests in flight is then set by Little's law to S x (2 x the p99 measured at 0.8 S), since a full bound
of C requests served at S waits C / S, and checked as an operator would: the sized bound, then 0.8x of
it, and so on (never below 1.25x what 0.8 S holds in flight), until a short 0.8 S / 2 S pair meets the
objective; ``fixed`` keeps the flags. Then 0.8 S and 2 S alternate; 0.8 S must reject nothing and keep few
requests in flight. Target: p99 of admitted requests at 2 S at most 2x the p99 at 0.8 S, and the excess
rejected quickly. Records through the measurement toolkit: benchmarks/results/serve_overload/ (run.json
with the calibration, the admission search, the checks and the paired p99 ratio with its CI; trials.jsonl
with every 0.8 S and 2 S run, priced) and serve_overload.png.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from pathlib import Path

from aifactory.bench.analysis import summarize_configs
from aifactory.bench.context import collect_context
from aifactory.bench.loadgen import below_saturation, closed_loop, find_saturation, open_loop
from aifactory.bench.report import bar_chart
from aifactory.bench.results import interleaved, record_benchmark
from aifactory.bench.stats import medians, ratio_summary
from aifactory.serve.benchmarking import prepare_auth, private_cluster
from aifactory.serve.config import AutoscalingSpec, BatchingConfig, EmbeddingsArgs

RESULTS = Path(__file__).parent / "results"
REPLICA_CPUS = 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ingress", choices=("haproxy", "python"), default="haproxy")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per open-loop run of the comparison")
    p.add_argument("--calibrate-duration", type=float, default=5.0, help="seconds per calibration point")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-ongoing", type=int, default=32)
    p.add_argument("--max-queued", type=int, default=16)
    p.add_argument("--admission", choices=("sized", "fixed"), default="sized",
                   help="sized: after calibration, bound the requests in flight by Little's law to S x the latency "
                        "budget (2x the p99 at 0.8 S); fixed: keep --max-ongoing/--max-queued")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    started = time.time()
    prepare_auth()  # before Ray is imported: Ray reads its auth settings once per process
    from ray import serve

    from aifactory.serve.apps.embeddings import app_builder

    def app_args(max_ongoing: int, max_queued: int) -> EmbeddingsArgs:
        return EmbeddingsArgs(
            batching=BatchingConfig(max_batch_size=32, batch_wait_timeout_s=0.01),
            max_ongoing_requests=max_ongoing, max_queued_requests=max_queued, retry_after_s=1, num_cpus=REPLICA_CPUS,
            autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=1, slo_aware=False),
        )

    capacity = a.max_ongoing + a.max_queued
    admission = {"max_ongoing_requests": a.max_ongoing, "max_queued_requests": a.max_queued, "mode": a.admission}
    with private_cluster(ingress=a.ingress) as c:
        serve.run(app_builder(app_args(a.max_ongoing, a.max_queued)), name="embeddings", route_prefix="/embeddings")
        url = f"http://127.0.0.1:{c['port']}/embeddings/v1/embeddings"

        def body(i: int) -> dict:
            return {"model": "all-MiniLM-L6-v2", "input": f"request number {i} about serving under load"}

        def open_at(rate: float, duration_s: float) -> dict:
            m = asyncio.run(open_loop(url, body, rate_rps=rate, duration_s=duration_s, max_in_flight=1024)).metrics()
            return m | {"replica_cpu_s": REPLICA_CPUS * m["wall_s"]}

        asyncio.run(closed_loop(url, body, concurrency=32, total=200))  # warm-up
        closed = asyncio.run(closed_loop(url, body, concurrency=a.max_ongoing, total=800)).metrics()
        print(f"closed-loop estimate: {closed['throughput_rps']:.0f} rps (concurrency {a.max_ongoing}, "
              f"{closed['num_rejected']} rejected)", flush=True)
        s_rps, calibration = find_saturation(lambda r: open_at(r, a.calibrate_duration),
                                             start_rps=0.3 * closed["throughput_rps"], capacity=capacity)
        print(f"saturation S: {s_rps:.1f} rps (open loop, highest rate that kept up)", flush=True)
        if a.admission == "sized":
            # Admission control bounds latency only if the bound is a few service times deep: by Little's law
            # the last of C admitted requests drained at S waits C / S, then is served itself (~ p50). Size C
            # so that wait + service fits the budget, 2 x the p99 at 0.8 S; medians of three probes, since one
            # probe's p99 on 2 shared cores is noisy.
            # The last calibration points overloaded the server on purpose: let their backlog drain first
            # (probing at once read a p99 of 243 ms where the comparison then measured 66 ms).
            time.sleep(10)
            probes = [open_at(0.8 * s_rps, a.calibrate_duration) for _ in range(3)]
            probe = {k: statistics.median(p[k] for p in probes) for k in ("p50_ms", "p99_ms")}
            budget_s = 2 * probe["p99_ms"] / 1e3
            # ... but never below twice the requests 0.8 S itself holds in flight: a bound that 0.8 S fills
            # would reject or queue at the load meant to pass untouched (and caps the 2 S throughput).
            peak = max(p["peak_in_flight"] for p in probes)
            bound = max(2, 2 * peak, int(s_rps * (budget_s - probe["p50_ms"] / 1e3)))
            print(f"admission sized: p99 at 0.8 S {probe['p99_ms']:.0f} ms -> budget {budget_s * 1e3:.0f} ms -> "
                  f"bound {bound} in flight", flush=True)

            def deploy_bound(c: int) -> dict:
                ongoing = min(a.max_ongoing, max(1, c * 2 // 3))
                serve.run(app_builder(app_args(ongoing, max(1, c - ongoing))), name="embeddings",
                          route_prefix="/embeddings")
                if a.ingress == "haproxy":  # it drains the replaced replica for a fixed 30 s (RAY-2.60-NOTES)
                    time.sleep(35)
                asyncio.run(closed_loop(url, body, concurrency=4, total=40))  # warm the new replica
                return {"max_ongoing_requests": ongoing, "max_queued_requests": max(1, c - ongoing)}

            # Little's law sizes the bound from estimates (the goodput under overload, the service time of a
            # full batch), so check it as an operator would: try the sized bound, then 0.8x of it, and so on,
            # until a short 0.8 S / 2 S pair meets the latency objective with 0.8 S untouched (no rejection).
            # The bound never drops below 1.25x what 0.8 S holds in flight (a bound 0.8 S nearly fills rejects
            # its bursts). The final comparison below then measures the chosen bound afresh.
            floor, search, chosen = max(2, math.ceil(1.25 * peak)), [], None
            candidates = [bound]
            while candidates[-1] > floor and len(candidates) < 5:
                candidates.append(max(floor, int(candidates[-1] * 0.8)))
            for c in candidates:
                limits = deploy_bound(c)
                lo, hi = open_at(0.8 * s_rps, a.calibrate_duration), open_at(2.0 * s_rps, a.calibrate_duration)
                ok = (lo["num_rejected"] == 0 and lo["num_errors"] == 0 and None not in (lo["p99_ms"], hi["p99_ms"])
                      and hi["p99_ms"] <= 2 * lo["p99_ms"])
                search.append({"bound": c, **limits, "p99_0_8x_ms": lo["p99_ms"], "p99_2x_ms": hi["p99_ms"],
                               "rejected_0_8x": lo["num_rejected"], "meets": ok})
                print(f"  bound {c:3d}: p99 0.8 S {lo['p99_ms'] or 0:.0f} ms, 2 S {hi['p99_ms'] or 0:.0f} ms, "
                      f"rejected at 0.8 S {lo['num_rejected']}: {'meets' if ok else 'misses'} the objective",
                      flush=True)
                chosen = limits
                if ok:
                    break
            admission |= chosen | {"sized_from": {"saturation_rps": s_rps, "p99_0_8x_probe_ms": probe["p99_ms"],
                                                  "p50_0_8x_probe_ms": probe["p50_ms"], "latency_budget_s": budget_s,
                                                  "sized_bound": bound, "search": search}}
            capacity = admission["max_ongoing_requests"] + admission["max_queued_requests"]
            print(f"admission: {admission['max_ongoing_requests']} ongoing + {admission['max_queued_requests']} "
                  "queued", flush=True)
        runs = interleaved({"0.8x": lambda: open_at(0.8 * s_rps, a.duration),
                            "2x": lambda: open_at(2.0 * s_rps, a.duration)}, repeats=a.repeats)
    med = {k: medians(v) for k, v in runs.items()}
    low, high = med["0.8x"], med["2x"]
    low_clean = all(r["num_rejected"] == 0 and r["num_errors"] == 0 for r in runs["0.8x"])
    low_peak = max(r["peak_in_flight"] for r in runs["0.8x"])
    # 0.8 S must still run below saturation when compared (the host's load may have risen since calibration).
    low_checks = [below_saturation(r, capacity=capacity) for r in runs["0.8x"]]
    low_below = all(ok for ok, _ in low_checks)
    # 2 S must overload the server; if it did not, the cores got faster since calibration (other work on the
    # host stopped) and the comparison says nothing: flag it rather than claim the target.
    high_saturated = all(r["num_rejected"] > 0 or (r.get("answered_rps") or 0) < 0.95 * r["offered_rps"]
                         for r in runs["2x"])
    p99_ratio = ratio_summary([r["p99_ms"] for r in runs["2x"]], [r["p99_ms"] for r in runs["0.8x"]])
    result = {
        "ingress": a.ingress,
        "admission": admission | {"rejection": "429 + Retry-After (Serve BackpressureConfig)"},
        "closed_loop_estimate": closed, "calibration": calibration, "saturation_rps": s_rps,
        "median": med, "p99_ratio_2x_over_0_8x_paired": p99_ratio.to_dict(),
        "check_0_8x": {"nothing_rejected": low_clean, "peak_in_flight": low_peak,
                       "queue_short": low_clean and low_peak <= admission["max_ongoing_requests"],
                       "below_saturation": low_below, "reasons": [why for _, why in low_checks]},
        "check_2x": {"saturated": high_saturated},
        "valid": high_saturated and low_below,
        "p99_ratio_2x_over_0_8x": high["p99_ms"] / low["p99_ms"],
        "rejected_fraction_2x": high["num_rejected"] / max(1, high["num_requests"]),
        "target_met": high_saturated and low_below and high["p99_ms"] <= 2 * low["p99_ms"],
    }
    _, trials, folder = record_benchmark(
        "serve_overload", {"0.8S": runs["0.8x"], "2S": runs["2x"]}, out_dir=a.out, kind="serve-benchmark-overload",
        started_at=started, context=collect_context(model_version="all-MiniLM-L6-v2"), summary=result,
        params=vars(a) | {"load": "open loop"},
        knobs={"0.8S": {"offered_rps": 0.8 * s_rps}, "2S": {"offered_rps": 2 * s_rps}})
    bar_chart(Path(a.out) / "serve_overload.png", f"Overload with admission control ({a.ingress} ingress), "
              f"S = {s_rps:.0f} rps", summarize_configs(trials, family="serving"),
              [("throughput_rps", "admitted throughput (req/s)"), ("p99_ms", "p99 of admitted (ms)"),
               ("error_rate", "not answered 2xx (share)")])
    print(f"0.8 S = {0.8 * s_rps:.0f} rps offered: answered {low['throughput_rps']:.0f} rps, p99 {low['p99_ms']:.0f} ms, "
          f"rejected {low['num_rejected']:.0f}, peak in flight {low_peak} "
          f"({'below saturation' if low_below else 'NOT below saturation'})")
    print(f"2 S = {2 * s_rps:.0f} rps offered: answered {high['throughput_rps']:.0f} rps, p99 {high['p99_ms']:.0f} ms, "
          f"rejected {high['num_rejected']:.0f} of {high['num_requests']:.0f} (reject p99 {high.get('reject_p99_ms') or 0:.0f} ms)")
    if not result["valid"]:
        print("INVALID comparison: " + ("2 S did not saturate the server (the host's load changed since "
                                        "calibration); " if not high_saturated else "")
              + ("0.8 S was not below saturation when compared: " + "; ".join(why for _, why in low_checks)
                 if not low_below else ""))
    print(f"p99 ratio 2 S / 0.8 S: {result['p99_ratio_2x_over_0_8x']:.2f} (paired rounds: median "
          f"{p99_ratio.median or 0:.2f}, 95% CI [{p99_ratio.ci_low or 0:.2f}, {p99_ratio.ci_high or 0:.2f}]), target "
          f"(<= 2) {'met' if result['target_met'] else 'NOT met'}")
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
