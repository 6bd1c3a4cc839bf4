"""Measuring variants side by side with the serving engine: throughput, latency, memory, quality, cost.

Each variant is loaded exactly as a serving replica loads it (:func:`aifactory.serve.engine.load_version`:
digest-checked, variant structure rebuilt) and decodes with the replica's :class:`~aifactory.serve.engine.Decoder`
in batches of ``batch_size`` requests, like ``@serve.batch`` hands them over. Variants take turns round by
round, so a machine whose load drifts during the run (shared CI cores) penalises them alike. A request's
latency is the duration of the batch call that answered it. CPU-seconds are this process's CPU time while
the variant decoded, priced with the price book as a replica's would be (:mod:`aifactory.bench.outcomes`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VariantRun:
    ref: str
    label: str
    latencies_s: list[float] = field(default_factory=list)
    round_throughput_rps: list[float] = field(default_factory=list)
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


def _p(values: list[float], q: float) -> float | None:
    from aifactory.bench.stats import percentile  # the toolkit's one percentile (linear interpolation)

    return percentile(values, q * 100)


def compare_variants(registry_location: str, refs: dict[str, str], *, prompts: list[list[int]], max_tokens: int,
                     batch_size: int, rounds: int, log=lambda msg: None) -> dict[str, VariantRun]:
    """Decode ``prompts`` with each variant (label -> name:version) for ``rounds`` interleaved rounds."""
    import torch

    from aifactory.serve.engine import Decoder, GenItem, load_version

    decoders = {}
    for label, ref in refs.items():
        name, _, version = ref.partition(":")
        decoders[label] = Decoder(load_version(registry_location, name, version or None))
    runs = {label: VariantRun(ref, label) for label, ref in refs.items()}
    with torch.inference_mode():
        for dec in decoders.values():  # warm-up: first calls pay one-time allocation and kernel selection
            dec.generate([GenItem(tokens=prompts[0], max_tokens=2)])
        for r in range(rounds):
            for label, dec in decoders.items():
                run = runs[label]
                t_round, c_round = time.perf_counter(), time.process_time()
                for i in range(0, len(prompts), batch_size):
                    items = [GenItem(tokens=p, max_tokens=max_tokens) for p in prompts[i : i + batch_size]]
                    t0 = time.perf_counter()
                    out = dec.generate(items)
                    dt = time.perf_counter() - t0
                    run.latencies_s += [dt] * len(items)
                    run.tokens += sum(len(o.tokens) for o in out)
                wall = time.perf_counter() - t_round
                run.wall_s += wall
                run.cpu_s += time.process_time() - c_round
                run.requests += len(prompts)
                run.round_throughput_rps.append(len(prompts) / wall)
                log(f"round {r + 1}/{rounds} {label}: {len(prompts) / wall:.1f} req/s")
    return runs


def summarize(run: VariantRun, *, mv, quality: dict[str, Any], book, region: str = "local",
              tenant: str = "bench") -> dict[str, Any]:
    """One variant's row: throughput, latency, memory, quality and cost per 1k requests."""
    from aifactory.bench.outcomes import price_outcomes

    cfg = mv.model_config
    kv_bytes = 2 * cfg["n_layers"] * cfg["d_model"] * cfg["seq_len"] * 4  # keys + values, fp32, one sequence
    priced = price_outcomes({"num_ok": run.requests, "replica_cpu_s": run.cpu_s}, family="serving", book=book,
                            region=region, tenant=tenant)
    return {
        "model": run.ref, "variant": (mv.manifest.get("variant") or {}).get("method") or "parent",
        "params": _num_params(cfg), "requests": run.requests, "completion_tokens": run.tokens,
        "throughput_rps": statistics.median(run.round_throughput_rps),
        "throughput_rps_rounds": run.round_throughput_rps,
        "tokens_per_s": run.tokens / run.wall_s if run.wall_s else None,
        "p50_latency_s": _p(run.latencies_s, 0.50), "p99_latency_s": _p(run.latencies_s, 0.99),
        "weights_bytes": mv.size_bytes, "kv_cache_bytes_per_sequence": kv_bytes,
        "cpu_s": run.cpu_s, "cost_per_1k_requests_usd": priced["cost_per_1k_requests_usd"],
        "cost_unavailable": priced["unavailable"], **quality,
    }


def _num_params(cfg: dict[str, Any]) -> int:
    from aifactory.models.gpt import GPTConfig

    return GPTConfig.model_validate(cfg).num_params()
