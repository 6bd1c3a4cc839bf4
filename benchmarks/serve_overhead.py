"""Serve's per-request overhead: a no-op deployment over HTTP vs a bare ASGI app with uvicorn, same cores.

    .venv/bin/python -m benchmarks.serve_overhead [--ingress haproxy|python|both] [--repeats 3]

The same FastAPI handler (``POST /noop`` -> ``{"ok": true}``) runs (a) as a Serve deployment behind the
chosen ingress (HAProxy or the Python proxy) on a private loopback cluster, and (b) as a bare ASGI app in
one uvicorn process. A closed loop of ``--concurrency`` clients; variants interleave; medians of repeats.
Records through the measurement toolkit: benchmarks/results/serve_overhead/ (run.json with the added p50
and the paired throughput ratio with its CI per ingress, trials.jsonl, priced) and serve_overhead.png.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aifactory.bench.analysis import summarize_configs
from aifactory.bench.context import collect_context
from aifactory.bench.loadgen import closed_loop
from aifactory.bench.report import bar_chart
from aifactory.bench.results import interleaved, record_benchmark
from aifactory.bench.stats import medians, ratio_summary
from aifactory.serve.benchmarking import free_port, prepare_auth, private_cluster

RESULTS = Path(__file__).parent / "results"
REPLICA_CPUS = 0.5  # the no-op replica; the bare uvicorn process is priced at the same share


def noop_asgi():
    """The handler both variants serve."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/noop")
    async def noop() -> dict:
        return {"ok": True}

    return app


def _bare_server(port: int) -> subprocess.Popen:
    code = ("import uvicorn; from benchmarks.serve_overhead import noop_asgi; "
            f"uvicorn.run(noop_asgi(), host='127.0.0.1', port={port}, log_level='warning', access_log=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/noop", data=b"{}"), timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the bare uvicorn server did not start within 60 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ingress", choices=("haproxy", "python", "both"), default="both")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    started = time.time()
    prepare_auth()  # before Ray is imported: Ray reads its auth settings once per process
    from ray import serve

    def load(url: str):
        def run() -> dict:
            m = asyncio.run(closed_loop(url, lambda i: {}, concurrency=a.concurrency, total=a.requests)).metrics()
            return m | {"replica_cpu_s": REPLICA_CPUS * m["wall_s"]}
        return run

    result: dict = {"by_ingress": {}}
    variants: dict[str, list[dict]] = {}
    for ingress in (["haproxy", "python"] if a.ingress == "both" else [a.ingress]):
        try:
            with private_cluster(ingress=ingress) as c:
                NoOp = serve.deployment(serve.ingress(noop_asgi())(type("NoOp", (), {})),
                                        max_ongoing_requests=256, ray_actor_options={"num_cpus": REPLICA_CPUS})
                serve.run(NoOp.bind(), name="noop", route_prefix="/")
                bare_port = free_port()
                bare = _bare_server(bare_port)
                try:
                    variants = {f"serve ({ingress})": load(f"http://127.0.0.1:{c['port']}/noop"),
                                "bare uvicorn": load(f"http://127.0.0.1:{bare_port}/noop")}
                    for fn in variants.values():  # warm-up
                        fn()
                    runs = interleaved(variants, repeats=a.repeats)
                finally:
                    bare.terminate()
                    bare.wait(timeout=10)
            med = {k: medians(v) for k, v in runs.items()}
            s, b = med[f"serve ({ingress})"], med["bare uvicorn"]
            result["by_ingress"][ingress] = {
                "median": med, "added_p50_ms": s["p50_ms"] - b["p50_ms"],
                "throughput_ratio_serve_over_bare": ratio_summary(
                    [r["throughput_rps"] for r in runs[f"serve ({ingress})"]],
                    [r["throughput_rps"] for r in runs["bare uvicorn"]]).to_dict(),
            }
            variants[f"{ingress}/serve"] = runs[f"serve ({ingress})"]
            variants[f"{ingress}/bare-uvicorn"] = runs["bare uvicorn"]
            print(f"[{ingress}] serve {s['throughput_rps']:.0f} rps p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} ms | "
                  f"bare {b['throughput_rps']:.0f} rps p50 {b['p50_ms']:.1f} p99 {b['p99_ms']:.1f} ms", flush=True)
        except Exception as err:  # report a failed ingress (e.g. HAProxy ports taken) instead of dropping it
            result["by_ingress"][ingress] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{ingress}] FAILED: {err}", flush=True)
    if not variants:
        print("no ingress measured anything; nothing recorded")
        return 1
    _, trials, folder = record_benchmark(
        "serve_overhead", variants, out_dir=a.out, kind="serve-benchmark-overhead", started_at=started,
        context=collect_context(), summary=result, params=vars(a) | {"load": "closed loop"},
        knobs={k: {"ingress": k.split("/")[0], "server": k.split("/")[1]} for k in variants})
    bar_chart(Path(a.out) / "serve_overhead.png", f"No-op over HTTP: Serve vs bare ASGI (concurrency {a.concurrency})",
              summarize_configs(trials, family="serving"),
              [("throughput_rps", "throughput (req/s)"), ("p50_ms", "p50 (ms)"), ("p99_ms", "p99 (ms)")])
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
