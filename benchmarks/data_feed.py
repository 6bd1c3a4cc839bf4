"""python -m benchmarks.data_feed --max-mb 8 --repeats 3

Ray Data feed vs a torch DataLoader over the same Parquet shards vs synthetic in-memory tensors (the
no-I/O ceiling), side by side in one run, median of --repeats: rows/s of the feed alone, and the
data-wait fraction of a fixed compute step (a tiny model's forward + backward). Targets: wait < 5% of
step time; Ray Data rows/s >= 0.9x the DataLoader's (the median of the paired rounds, with its CI).
Records through the measurement toolkit: benchmarks/results/data_feed/ (run.json, trials.jsonl with every
round's figures; ``factory bench report|compare`` read it) and data_feed.png, and prints a table. Uses the cluster of --address / RAY_ADDRESS / `factory up`, else an
embedded one. The machinery lives in aifactory.data.feedbench.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="measured steps per run (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--prefetch-batches", type=int, default=2)
    p.add_argument("--address")
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    started = time.time()

    import torch

    from aifactory.cluster.connect import apply_ray_env, ensure_token, init_ray, resolve_address
    from aifactory.cluster.local import free_port  # an embedded cluster must not collide with one on 8265
    from aifactory.data.feed import iter_token_batches, read_split
    from aifactory.data.feedbench import compute_step_fn, measure, parquet_token_loader, timed
    from aifactory.data.ingest import IngestConfig, ingest
    from aifactory.home import FactoryHome
    from aifactory.tenancy import TenantRef, WorkloadKind, job_metadata

    home = FactoryHome.from_env().ensure()
    tenant = TenantRef(tenant="bench")
    address = resolve_address(home, args.address)
    if address is None:
        ensure_token(home)
    apply_ray_env(home)  # before Ray's first import: it reads RAY_AUTH_MODE once, then
    init_ray(home, address=address, num_cpus=args.num_cpus, dashboard_port=free_port(),
             job_metadata=job_metadata(tenant, workload=WorkloadKind.BENCH, extra={"entrypoint": "benchmarks.data_feed"}))
    import ray

    try:
        res = ingest(home, IngestConfig(max_mb=args.max_mb, seq_len=args.seq_len, target_shard_mb=1.0), tenant=tenant,
                     log=print)
        v = res.dataset
        files = v.files("train")
        rows_total = v.manifest.splits["train"].rows
        steps = min(args.steps, rows_total // args.batch_size - 2)
        bs = args.batch_size
        synthetic = [torch.randint(0, 256, (bs, args.seq_len), dtype=torch.int64) for _ in range(steps + 1)]
        feeds = {
            "ray_data": lambda: iter_token_batches(read_split(v, "train"), batch_size=bs, prefetch_batches=args.prefetch_batches),
            "torch_dataloader": lambda: timed(parquet_token_loader(files, batch_size=bs, num_workers=args.loader_workers)),
            "synthetic": lambda: timed(iter(synthetic)),
        }
        compute = compute_step_fn()
        runs: dict[str, dict[str, list[dict]]] = {name: {"feed_only": [], "with_compute": []} for name in feeds}
        for r in range(args.repeats):
            for name, make in feeds.items():  # interleaved, so drift in machine load hits every feed alike
                runs[name]["feed_only"].append(measure(make(), steps=steps, compute=None))
                runs[name]["with_compute"].append(measure(make(), steps=steps, compute=compute))
                print(f"repeat {r + 1}/{args.repeats} {name}: {runs[name]['feed_only'][-1]['rows_per_s']:,.0f} rows/s, "
                      f"wait {100 * runs[name]['with_compute'][-1]['data_wait_fraction']:.2f}%", flush=True)
    finally:
        ray.shutdown()

    def med(name, mode, key):
        return statistics.median(x[key] for x in runs[name][mode])

    summary = {name: {"rows_per_s": med(name, "feed_only", "rows_per_s"),
                      "rows_per_s_with_compute": med(name, "with_compute", "rows_per_s"),
                      "data_wait_fraction": med(name, "with_compute", "data_wait_fraction"),
                      "median_wait_ms": med(name, "with_compute", "median_wait_ms"),
                      "startup_s": med(name, "feed_only", "startup_s")} for name in feeds}
    from aifactory.bench.analysis import summarize_configs
    from aifactory.bench.context import collect_context
    from aifactory.bench.report import bar_chart
    from aifactory.bench.results import record_benchmark
    from aifactory.bench.stats import ratio_summary

    paired = ratio_summary([x["rows_per_s"] for x in runs["ray_data"]["feed_only"]],
                           [x["rows_per_s"] for x in runs["torch_dataloader"]["feed_only"]])
    ratio = paired.median
    out = {
        "dataset": v.version, "train_rows": rows_total, "shards": len(files), "feeds": summary,
        "ray_vs_dataloader_rows_ratio": paired.to_dict(),
        "targets": {"wait_below_5pct": summary["ray_data"]["data_wait_fraction"] < 0.05, "ratio_at_least_0.9": ratio >= 0.9},
    }
    # One trial per feed and round: the feed alone (rows/s = samples/s) and with the compute step (data wait).
    variants = {name: [{"samples_per_s": fo["rows_per_s"], "rows_per_s_with_compute": wc["rows_per_s"],
                        "data_wait_fraction": wc["data_wait_fraction"], "median_wait_ms": wc["median_wait_ms"],
                        "startup_s": fo["startup_s"], "samples": fo["rows"],
                        "train_cpu_s": args.num_cpus * (fo["seconds"] + wc["seconds"])}
                       for fo, wc in zip(r["feed_only"], r["with_compute"])] for name, r in runs.items()}
    _, trials, folder = record_benchmark(
        "data_feed", variants, out_dir=args.out, kind="data-benchmark-feed", started_at=started, summary=out,
        context=collect_context(dataset_version=v.version), params={**vars(args), "steps": steps},
        knobs={name: {"feed": name} for name in variants})
    bar_chart(Path(args.out) / "data_feed.png", "data feeds", summarize_configs(trials, family="training"),
              [("samples_per_s", "feed throughput (rows/s, no compute)"),
               ("data_wait_fraction", "data-wait share of a fixed compute step")])

    print(f"\ndata feed: {v.version}, {rows_total} train rows x {args.seq_len} tokens, {len(files)} shards, batch {bs}, "
          f"{steps} steps, median of {args.repeats}")
    print(f"{'feed':18} {'rows/s':>12} {'rows/s+compute':>15} {'data-wait':>10} {'median wait':>12} {'startup':>8}")
    for name, s in summary.items():
        print(f"{name:18} {s['rows_per_s']:>12,.0f} {s['rows_per_s_with_compute']:>15,.0f} "
              f"{100 * s['data_wait_fraction']:>9.2f}% {s['median_wait_ms']:>10.2f}ms {s['startup_s']:>7.1f}s")
    print(f"ray_data / torch_dataloader rows/s = {ratio:.2f} (target >= 0.9); "
          f"ray_data wait {100 * summary['ray_data']['data_wait_fraction']:.2f}% (target < 5%)")
    print(f"ray_data / torch_dataloader rows/s, paired rounds: 95% CI [{paired.ci_low or 0:.2f}, {paired.ci_high or 0:.2f}]")
    print(f"results: {folder}  plot: {Path(args.out) / 'data_feed.png'}")


if __name__ == "__main__":
    main()
