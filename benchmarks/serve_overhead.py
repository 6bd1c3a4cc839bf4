"""Serve's per-request overhead: a no-op deployment over HTTP vs a bare ASGI app with uvicorn, same cores.

    .venv/bin/python -m benchmarks.serve_overhead [--ingress haproxy|python|both] [--repeats 3]

The same FastAPI handler (``POST /noop`` -> ``{"ok": true}``) runs (a) as a Serve deployment behind the
chosen ingress (HAProxy or the Python proxy) on a private loopback cluster, and (b) as a bare ASGI app in
one uvicorn process. A closed loop of ``--concurrency`` clients; variants interleave; medians of repeats.
Writes benchmarks/results/serve_overhead.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aifactory.serve.benchmarking import (
    bar_chart, context, free_port, interleaved, medians, prepare_auth, private_cluster, write_results,
)
from aifactory.serve.loadgen import closed_loop

RESULTS = Path(__file__).parent / "results"


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
    prepare_auth()  # before Ray is imported: Ray reads its auth settings once per process
    from ray import serve

    def load(url: str):
        return lambda: asyncio.run(closed_loop(url, lambda i: {}, concurrency=a.concurrency, total=a.requests)).summary()

    result = {"benchmark": "serve_overhead", "context": context(),
              "load": {"kind": "closed loop", "concurrency": a.concurrency, "requests_per_run": a.requests,
                       "repeats": a.repeats}, "by_ingress": {}}
    groups = {}
    for ingress in (["haproxy", "python"] if a.ingress == "both" else [a.ingress]):
        try:
            with private_cluster(ingress=ingress) as c:
                NoOp = serve.deployment(serve.ingress(noop_asgi())(type("NoOp", (), {})),
                                        max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
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
                "runs": runs, "median": med,
                "added_p50_ms": s["p50_ms"] - b["p50_ms"],
                "throughput_ratio_serve_over_bare": s["throughput_rps"] / b["throughput_rps"],
            }
            groups[f"serve\n{ingress}"] = s
            groups[f"bare uvicorn\n(vs {ingress})"] = b
            print(f"[{ingress}] serve {s['throughput_rps']:.0f} rps p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} ms | "
                  f"bare {b['throughput_rps']:.0f} rps p50 {b['p50_ms']:.1f} p99 {b['p99_ms']:.1f} ms", flush=True)
        except Exception as err:  # report a failed ingress (e.g. HAProxy ports taken) instead of dropping it
            result["by_ingress"][ingress] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{ingress}] FAILED: {err}", flush=True)
    path = write_results("serve_overhead", result, out_dir=a.out)
    if groups:
        bar_chart(Path(a.out) / "serve_overhead.png", f"No-op over HTTP: Serve vs bare ASGI (concurrency {a.concurrency})",
                  groups, [("throughput_rps", "throughput (req/s)"), ("p50_ms", "p50 (ms)"), ("p99_ms", "p99 (ms)")])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
