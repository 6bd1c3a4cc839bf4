"""The static generation engine vs the continuous-batching one, side by side in one run (issue 17).

    .venv/bin/python -m benchmarks.serve_engine [--repeats 3] [--d-model 256] [--requests 192]

In-process (no Serve: the engine ratio is the engine's; the ingress and proxy are the same for both), one
engine thread, torch threads 1, the same random-weight GPT (EOS masked so that answers have the lengths
drawn), the same seeded workload for both: Poisson arrivals, prompt and output lengths from lognormal
distributions (output p99/p50 >= 10). Drivers: :mod:`aifactory.bench.engine_trial` (the static one is kinder
to the static engine than the Serve app is: no batch window, every waiting request joins the next call).
Per round, variants interleaved (static, continuous), medians and paired-ratio CIs over ``--repeats`` rounds:

1. saturation: a backlog (arrivals at 100x the load either engine sustains); generated tokens/s,
   target new / old >= 3.0, both with 32 rows per model call;
2. at 80% of the static engine's saturation request rate (measured in 1.): TTFT p99, target new / old <= 0.5;
3. the continuous engine alone: interactive requests at 20% of its saturation rate, alone and with a
   concurrent batch-class flood (at its saturation rate) on the same engine; interactive p99 flood / alone,
   target <= 1.25.

Records through the measurement toolkit: benchmarks/results/serve_engine/ (run.json with the ratios, CIs and
targets; trials.jsonl with every round) and serve_engine.png beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from aifactory.bench.analysis import summarize_configs
from aifactory.bench.context import collect_context
from aifactory.bench.engine_trial import (
    Workload,
    length_stats,
    run_continuous,
    run_static,
)
from aifactory.bench.loadgen import poisson_offsets
from aifactory.bench.report import bar_chart
from aifactory.bench.results import interleaved, record_benchmark
from aifactory.bench.stats import medians, ratio_summary
from aifactory.serve.config import ContinuousBatchingConfig

RESULTS = Path(__file__).parent / "results"
ROWS = 32  # rows per model call for both engines: the batch class's max_batch_size


def build_model(d_model: int, n_layers: int, seq_len: int):
    import torch
    from aifactory.data.tokenizer import EOS
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.serve.engine import LoadedModel

    torch.manual_seed(0)
    cfg = GPTConfig(seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=8, d_ff=4 * d_model)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.head.bias[EOS] = -1e9  # random weights: without this, answers end at a random EOS, not at max_tokens
    return LoadedModel("bench-gpt", "random", "0" * 64, model, cfg.seq_len, 0.0), cfg


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=192, help="requests per saturation run")
    p.add_argument("--rate-requests", type=int, default=160, help="requests per run at 80%% of static saturation")
    p.add_argument("--interactive-requests", type=int, default=80)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens-per-step", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(1)
    loaded, cfg = build_model(a.d_model, a.n_layers, a.seq_len)
    work = Workload(prompt_median=24, prompt_sigma=0.6, max_prompt=64, output_median=12, output_sigma=1.1,
                    max_output=a.seq_len - 64)
    cb = ContinuousBatchingConfig(max_num_seqs=ROWS, max_tokens_per_step=a.max_tokens_per_step)
    static = lambda arr: lambda: run_static(loaded, arr, max_batch_size=ROWS)
    cont = lambda arr: lambda: run_continuous(loaded, arr, config=cb)

    backlog = work.draw(poisson_offsets(10_000.0, a.requests, seed=1), seed=1)
    lengths = length_stats(backlog)
    print(f"model d_model={a.d_model} n_layers={a.n_layers} seq_len={a.seq_len} "
          f"({cfg.num_params() / 1e6:.1f}M params); workload {lengths}", flush=True)
    print("warm-up (kernel builds for new shapes) ...", flush=True)
    static(backlog[:64])()
    cont(backlog[:64])()

    print("1. saturation", flush=True)
    sat = interleaved({"static/saturation": static(backlog), "continuous/saturation": cont(backlog)},
                      repeats=a.repeats)
    old_rps = medians(sat["static/saturation"])["throughput_rps"]
    new_rps = medians(sat["continuous/saturation"])["throughput_rps"]

    rate = 0.8 * old_rps
    print(f"2. Poisson at {rate:.1f} req/s (80% of the static engine's {old_rps:.1f})", flush=True)
    at80 = work.draw(poisson_offsets(rate, a.rate_requests, seed=2), seed=2)
    load = interleaved({"static/80pct": static(at80), "continuous/80pct": cont(at80)}, repeats=a.repeats)

    i_rate = 0.2 * new_rps
    inter = work.draw(poisson_offsets(i_rate, a.interactive_requests, seed=3), seed=3)
    span = inter[-1].at_s
    flood = work.draw(poisson_offsets(new_rps, max(1, int(new_rps * span)), seed=4), seed=4, slo_class="batch")
    mixed = sorted(inter + flood, key=lambda r: r.at_s)
    print(f"3. interactive at {i_rate:.1f} req/s alone and with {len(flood)} batch-class requests at "
          f"{new_rps:.1f} req/s", flush=True)
    prio = interleaved({"continuous/interactive-alone": cont(inter), "continuous/interactive+batch-flood": cont(mixed)},
                       repeats=a.repeats)

    runs = sat | load | prio

    def ratio(num: str, den: str, key: str, key_den: str | None = None) -> dict:
        return ratio_summary([r[key] for r in runs[num]], [r[key_den or key] for r in runs[den]]).to_dict()

    tok = ratio("continuous/saturation", "static/saturation", "tokens_per_s")
    ttft = ratio("continuous/80pct", "static/80pct", "ttft_p99_ms")
    i_e2e = ratio("continuous/interactive+batch-flood", "continuous/interactive-alone", "interactive_p99_ms")
    i_ttft = ratio("continuous/interactive+batch-flood", "continuous/interactive-alone", "interactive_ttft_p99_ms")
    summary = {
        "model": f"random-weight GPT d_model={a.d_model} n_layers={a.n_layers} seq_len={a.seq_len}, torch threads 1",
        "workload": lengths | {"prompt": "lognormal median 24 sigma 0.6 <= 64",
                               "output": f"lognormal median 12 sigma 1.1 <= {a.seq_len - 64}"},
        "rows_per_call": ROWS, "continuous_config": cb.model_dump(),
        "static_saturation_rps": old_rps, "continuous_saturation_rps": new_rps, "rate_80pct_rps": rate,
        "interactive_rate_rps": i_rate, "flood_requests": len(flood),
        "tokens_per_s_new_over_old": tok, "ttft_p99_new_over_old_at_80pct": ttft,
        "interactive_p99_flood_over_alone": i_e2e, "interactive_ttft_p99_flood_over_alone": i_ttft,
        "targets": {"tokens_per_s_new_over_old": ">= 3.0", "ttft_p99_new_over_old_at_80pct": "<= 0.5",
                    "interactive_p99_flood_over_alone": "<= 1.25"},
        "target_met": {"tokens_per_s_new_over_old": (tok["median"] or 0) >= 3.0,
                       "ttft_p99_new_over_old_at_80pct": (ttft["median"] or 1e9) <= 0.5,
                       "interactive_p99_flood_over_alone": (i_e2e["median"] or 1e9) <= 1.25},
    }
    _, trials, folder = record_benchmark(
        "serve_engine", runs, out_dir=a.out, kind="serve-benchmark-engine", started_at=started,
        context=collect_context(model_version="bench-gpt:random"), summary=summary,
        params=vars(a) | {"load": "in-process, Poisson arrivals", "rows_per_call": ROWS},
        knobs={k: {"engine": k.split("/")[0], "load": k.split("/")[1]} for k in runs})
    bar_chart(Path(a.out) / "serve_engine.png", "static vs continuous-batching engine (in-process, 1 thread)",
              summarize_configs(trials, family="serving"),
              [("tokens_per_s", "generated tokens/s"), ("ttft_p99_ms", "TTFT p99 (ms)"), ("p99_ms", "latency p99 (ms)")])
    med = {k: medians(v) for k, v in runs.items()}
    for k, m in med.items():
        print(f"{k:36s} tokens/s {m['tokens_per_s']:7.0f}  req/s {m['throughput_rps']:6.1f}  TTFT p50/p99 "
              f"{m['ttft_p50_ms']:6.0f}/{m['ttft_p99_ms']:6.0f} ms  p99 {m['p99_ms']:6.0f} ms")
    for name, r in (("tokens/s new/old (saturation)", tok), ("TTFT p99 new/old at 80%", ttft),
                    ("interactive p99 flood/alone", i_e2e), ("interactive TTFT p99 flood/alone", i_ttft)):
        print(f"{name:34s} x{r['median']:.2f} [{r['ci_low'] or 0:.2f}, {r['ci_high'] or 0:.2f}]")
    print(f"targets met: {summary['target_met']}")
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
