"""The always-on meter's overhead: a serving load and a training run with the meter on vs off, in one run.

    .venv/bin/python -m benchmarks.metering_overhead [--rounds 5] [--requests 3000] [--train-steps 3000]

One private loopback cluster (``factory up``'s ``LocalCluster``, which starts the meter as usual). Each
round measures both workloads with the meter running and with it stopped (``LocalCluster.stop_meter`` /
``start_meter``, what ``factory meter stop|start`` do), the order of on and off alternating from round to
round, so drift of the shared host hits both alike:

- serving: the ``serve-mlp`` app (a small torch MLP behind ``@serve.batch``, 1 replica) under a closed loop
  of ``--concurrency`` clients (:mod:`aifactory.bench.loadgen`); throughput of 2xx answers;
- training: the ``train-mlp`` worker loop on 1 Ray Train worker through the factory's Ray Train launch
  (``aifactory.train.runner.fit_trainer``), a fixed number of steps; samples/s measured inside the worker.

The meter samples at its default interval (what ``factory up`` runs). Its own process's CPU time is read
while it runs, to explain what overhead there is. Figures: medians per variant with 95% CIs, and the
paired on/off throughput ratio per round with a bootstrap CI (:func:`aifactory.bench.stats.ratio_summary`).
Target: ratio >= 0.98 for both, judged on the CI (:func:`verdict`): met only when the whole interval is
at or above it. Also recorded: the GCS's and dashboard's CPU with the meter on vs off (the state-API load). Writes benchmarks/results/metering_overhead_serving/ and
metering_overhead_training/ (run.json + trials.jsonl each, for ``factory bench report|compare``) and
metering_overhead.png beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from aifactory.serve.benchmarking import prepare_auth, private_cluster

RESULTS = Path(__file__).parent / "results"
TARGET = 0.98


def _proc_cpu_s(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - the process is gone or not ours: unknown, not zero
        return None


def _head_cpu_s(temp_dir: str) -> float | None:
    """CPU seconds so far of the head's GCS and dashboard processes, the dashboard's module subprocesses
    included (what the meter's state-API calls load)."""
    try:
        import psutil
    except ImportError:
        return None
    procs = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if temp_dir in cmd and ("gcs_server" in (proc.info["name"] or "") or "dashboard/" in cmd):
                procs[proc.pid] = proc
                for child in proc.children(recursive=True):
                    procs[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    total = 0.0
    for proc in procs.values():
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def verdict(ratio, target: float = TARGET) -> str:
    """'met' when the whole 95% CI of the ratio is at or above ``target``, 'not met' when all of it is below,
    else 'inconclusive': a median above the target inside a wide interval shows nothing."""
    if ratio.ci_low is None:
        return "inconclusive (no CI)"
    if ratio.ci_low >= target:
        return "met"
    if ratio.ci_high < target:
        return "not met"
    return f"inconclusive (95% CI [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}] spans {target})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=3000, help="requests per serving run (a few seconds)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--train-steps", dest="train_steps", type=int, default=3000, help="steps per training run (several seconds)")
    p.add_argument("--ingress", choices=("haproxy", "python"), default="haproxy")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.rounds < 2:
        p.error("--rounds must be >= 2: a CI of the ratio needs at least two paired rounds")
    started = time.time()
    prepare_auth()  # before Ray is imported: Ray reads its auth settings once per process
    from ray import serve

    from aifactory.bench.context import collect_context
    from aifactory.bench.loadgen import closed_loop
    from aifactory.bench.mlp_app import build_app
    from aifactory.bench.report import bar_chart
    from aifactory.bench.analysis import summarize_configs
    from aifactory.bench.results import record_benchmark
    from aifactory.bench.spec import MLPModelSpec, ServingKnobs, TrainingKnobs, TrainRunSpec
    from aifactory.bench.stats import ratio_summary
    from aifactory.bench.train_trial import train_worker
    from aifactory.train.runner import fit_trainer

    model = MLPModelSpec(input_dim=128, hidden_dim=256, num_layers=2, output_dim=8)
    knobs = ServingKnobs(max_batch_size=16, batch_wait_timeout_s=0.005, num_replicas=1)
    replica_cpus = 0.5
    train_model = MLPModelSpec(input_dim=32, hidden_dim=128, num_layers=2, output_dim=4)
    tknobs = TrainingKnobs(num_workers=1, precision="fp32", sharding="none", batch_size=64)
    # An unreachable target: every run trains exactly --train-steps steps (or stops at max_seconds).
    trun = TrainRunSpec(target_val_loss=1e-9, max_steps=a.train_steps, max_seconds=120, eval_every_steps=50,
                        cpus_per_worker=1.0)
    storage = tempfile.mkdtemp(prefix="aif-bench-meter-train-")
    rng = random.Random(0)
    pool = [[rng.gauss(0.0, 1.0) for _ in range(model.input_dim)] for _ in range(64)]
    variants: dict[str, list[dict]] = {f"{w}/meter-{m}": [] for w in ("serving", "training") for m in ("on", "off")}
    meter_log: list[dict] = []

    with private_cluster(ingress=a.ingress) as c:
        cluster, state = c["cluster"], c["state"]
        meter_on = state.meter_cluster_id is not None
        interval = state.meter_sample_interval_s
        print(f"cluster up in {c['start_s']:.1f}s; meter {'on' if meter_on else 'OFF'} "
              f"(sample interval {interval} s)", flush=True)
        serve.run(build_app(model=model, knobs=knobs, replica_num_cpus=replica_cpus, tenant="bench"), name="mlp",
                  route_prefix="/mlp")
        url = f"http://127.0.0.1:{c['port']}/mlp"

        def body(i: int) -> dict:
            return {"inputs": pool[i % len(pool)]}

        def serving() -> dict:
            m = asyncio.run(closed_loop(url, body, concurrency=a.concurrency, total=a.requests,
                                        headers={"X-Tenant": "bench"})).metrics()
            m["replica_cpu_s"] = replica_cpus * knobs.num_replicas * m["wall_s"]
            return m

        def training(tag: str) -> dict:
            config = {"model": train_model.model_dump(), "knobs": tknobs.model_dump(), "train": trun.model_dump(),
                      "seed": 0, "task_seed": 10_000}
            t0 = time.perf_counter()
            result, error = fit_trainer(train_worker, config, run_id=f"meter-{tag}-{time.time_ns()}", storage=storage,
                                        num_workers=1, cpus_per_worker=1.0, use_gpu=False, max_failures=0,
                                        keep_last=None)
            if error is not None:
                raise error
            m = dict(result.metrics or {})
            m["fit_s"] = time.perf_counter() - t0
            m["train_cpu_s"] = trun.cpus_per_worker * (m.get("train_wall_s") or 0.0)
            return m

        def set_meter(on: bool) -> None:
            nonlocal state
            t0 = time.monotonic()
            if on and state.meter_cluster_id is None:
                state = cluster.start_meter(state)
            elif not on and state.meter_cluster_id is not None:
                cluster.stop_meter(state)
                state = state.model_copy(update={"meter_cluster_id": None})
            print(f"  meter {'started' if on else 'stopped'} in {time.monotonic() - t0:.1f}s", flush=True)
            if on:
                time.sleep(min(interval or 10.0, 10.0))  # let it take its first samples before measuring

        def meter_pid() -> int | None:
            import ray

            from aifactory.cost.collector import get_collector

            try:
                handle = get_collector()
                return ray.get(handle.status.remote(), timeout=30).get("pid") if handle is not None else None
            except Exception:  # noqa: BLE001 - the pid explains the figure; the figure does not need it
                return None

        serving()  # warm-up: the replica's first batches build oneDNN kernels
        training("warmup")
        for r in range(a.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                set_meter(on)
                tag = "on" if on else "off"
                pid = meter_pid() if on else None
                cpu0, head0, t0 = _proc_cpu_s(pid), _head_cpu_s(state.temp_dir), time.monotonic()
                s = serving()
                t = training(tag)
                cpu1, head1, dt = _proc_cpu_s(pid), _head_cpu_s(state.temp_dir), time.monotonic() - t0
                variants[f"serving/meter-{tag}"].append(s)
                variants[f"training/meter-{tag}"].append(t)
                meter_log.append({"round": r, "meter": tag, "collector_pid": pid, "wall_s": dt,
                                  "collector_cpu_s": (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
                                  "gcs_dashboard_cpu_s": (head1 - head0) if None not in (head0, head1) else None})
                print(f"  round {r + 1}/{a.rounds} meter {tag}: serving {s['throughput_rps']:.1f} req/s "
                      f"(p99 {s['p99_ms']:.0f} ms), training {t.get('samples_per_s') or 0:.0f} samples/s"
                      + (f", collector CPU {meter_log[-1]['collector_cpu_s']:.2f} s over {dt:.0f} s"
                         if meter_log[-1]["collector_cpu_s"] is not None else ""), flush=True)
        set_meter(True)  # leave the cluster as `factory up` runs it; `down` flushes and stops it
        ctx = collect_context(flags={"meter_sample_interval_s": interval, "serve_ingress": a.ingress})

    serve_ratio = ratio_summary([x["throughput_rps"] for x in variants["serving/meter-on"]],
                                [x["throughput_rps"] for x in variants["serving/meter-off"]])
    train_ratio = ratio_summary([x.get("samples_per_s") for x in variants["training/meter-on"]],
                                [x.get("samples_per_s") for x in variants["training/meter-off"]])
    cpu = [m["collector_cpu_s"] / m["wall_s"] for m in meter_log if m["collector_cpu_s"] is not None]

    def head_share(tag: str) -> float | None:
        xs = [m["gcs_dashboard_cpu_s"] / m["wall_s"] for m in meter_log
              if m["meter"] == tag and m["gcs_dashboard_cpu_s"] is not None]
        return statistics.median(xs) if xs else None

    summary = {
        "serving_throughput_ratio_on_over_off": serve_ratio.to_dict(),
        "training_samples_per_s_ratio_on_over_off": train_ratio.to_dict(),
        "collector_cpu_share_while_on": max(cpu) if cpu else None,  # of one core, the highest phase
        # The state API's side: GCS + dashboard CPU per second of wall time, median of the phases.
        "gcs_dashboard_cpu_share": {"meter_on": head_share("on"), "meter_off": head_share("off")},
        "host_cores": os.cpu_count(),
        "meter_phases": meter_log,
        "target": f"throughput ratio (meter on / off) >= {TARGET}",
        "verdict": {"serving": verdict(serve_ratio), "training": verdict(train_ratio)},
    }
    params = vars(a) | {"serve_model": model.model_dump(), "serve_knobs": knobs.model_dump(mode="json"),
                        "train_model": train_model.model_dump(), "train_knobs": tknobs.model_dump(),
                        "train_run": trun.model_dump(), "meter_sample_interval_s": interval}
    summaries, folders = [], []
    for workload, kind in (("serving", "serve-benchmark-metering"), ("training", "train-benchmark-metering")):
        mine = {k.split("/")[1]: v for k, v in variants.items() if k.startswith(workload)}
        _, trials, folder = record_benchmark(
            f"metering_overhead_{workload}", mine, out_dir=a.out, kind=kind, started_at=started, context=ctx,
            params=params, knobs={k: {"workload": workload, "meter": k.split("-")[-1]} for k in mine},
            summary=summary, notes="Paired rounds, on/off order alternating; serving counts 2xx answers only.")
        summaries += summarize_configs(trials, family="serving" if workload == "serving" else "training")
        folders.append(folder)
    bar_chart(Path(a.out) / "metering_overhead.png", "meter on vs off", summaries,
              [("throughput_rps", "serving (req/s)"), ("p99_ms", "serving p99 (ms)"),
               ("samples_per_s", "training (samples/s)")])
    for name, s in (("serving throughput", serve_ratio), ("training samples/s", train_ratio)):
        ci = f"[{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.ci_low is not None else "(no CI)"
        print(f"{name}: meter on / off = {s.median:.3f} median of {s.n} rounds, 95% CI {ci}; target >= {TARGET} "
              f"{verdict(s)}")
    if cpu:
        print(f"collector CPU while on: {100 * max(cpu):.2f}% of one core at most")
    hs = summary["gcs_dashboard_cpu_share"]
    if None not in hs.values():
        print(f"GCS + dashboard CPU: {100 * hs['meter_on']:.2f}% of one core with the meter on, "
              f"{100 * hs['meter_off']:.2f}% off (medians of the phases)")
    print("wrote " + ", ".join(str(f) for f in folders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
