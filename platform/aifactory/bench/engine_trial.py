"""Generation engines under an arrival process, in-process: the static engine vs the continuous-batching one.

What ``benchmarks/serve_engine.py`` measures with. No Serve and no HTTP: the figure of interest is the
engine's own (tokens per second, time to first token), and the proxy and the ingress are the same for both
engines. Both drivers run on the calling thread against the same wall clock, with requests that "arrive" at
their offsets (:func:`aifactory.bench.loadgen.poisson_offsets`):

- :func:`run_static` is the completions app's static path: one model call at a time, each taking every
  request that arrived while the previous call ran (up to ``max_batch_size``, in arrival order), decoded by
  :class:`aifactory.serve.engine.Decoder` (length groups one after another) to its end. This is *kinder* to
  the static engine than the app is: it waits no batch window, and Ray 2.60's ``@serve.batch`` closes a batch
  every window even while the model is busy (see :mod:`aifactory.serve.batching`), so in the app a batch holds
  only one window's arrivals.
- :func:`run_continuous` adds each request to :class:`aifactory.serve.engine_cb.ContinuousEngine` when it
  arrives and steps while there is work.

A request's TTFT runs from its arrival to its first token; its latency to its last.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aifactory.bench.stats import percentile


@dataclass
class Arrival:
    """One request of a workload: when it arrives (s after the start) and what it asks."""

    at_s: float
    tokens: list[int]
    max_tokens: int
    slo_class: str = "interactive"


@dataclass
class _Seen:
    arrival: Arrival
    first_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    """Prompt and output lengths drawn from lognormal distributions (median, sigma of the log), clipped."""

    prompt_median: float = 32
    prompt_sigma: float = 0.8
    output_median: float = 8
    output_sigma: float = 1.1
    max_prompt: int = 160
    max_output: int = 96
    vocab: int = 256

    def draw(self, offsets: Sequence[float], *, seed: int, slo_class: str = "interactive") -> list[Arrival]:
        rng = random.Random(seed)

        def ln(median: float, sigma: float, hi: int) -> int:
            return max(1, min(hi, round(math.exp(rng.gauss(math.log(median), sigma)))))

        return [Arrival(t, [rng.randrange(self.vocab) for _ in range(ln(self.prompt_median, self.prompt_sigma,
                                                                         self.max_prompt))],
                        ln(self.output_median, self.output_sigma, self.max_output), slo_class) for t in offsets]


def length_stats(arrivals: Sequence[Arrival]) -> dict[str, float | None]:
    """p50 and p99 of the prompt and output lengths a workload drew (and output p99 / p50)."""
    out = [a.max_tokens for a in arrivals]
    prompt = [len(a.tokens) for a in arrivals]
    p50, p99 = percentile(out, 50), percentile(out, 99)
    return {"prompt_p50": percentile(prompt, 50), "prompt_p99": percentile(prompt, 99), "output_p50": p50,
            "output_p99": p99, "output_p99_over_p50": (p99 / p50) if p50 else None}


def _items(arrivals: Sequence[Arrival]):
    from aifactory.serve.engine import GenItem

    return [GenItem(tokens=a.tokens, max_tokens=a.max_tokens, slo_class=a.slo_class) for a in arrivals]


def _wait_for(t0: float, at_s: float) -> None:
    delay = t0 + at_s - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_static(loaded, arrivals: Sequence[Arrival], *, max_batch_size: int) -> dict[str, Any]:
    """The static engine: one batch at a time, each decoded to its end (see the module docstring)."""
    from aifactory.serve.engine import Decoder

    decoder = Decoder(loaded)
    items = _items(arrivals)
    seen = [_Seen(a) for a in arrivals]
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(arrivals):
        now = time.perf_counter() - t0
        if arrivals[nxt].at_s > now:
            _wait_for(t0, arrivals[nxt].at_s)
            continue
        batch = []
        while nxt < len(arrivals) and arrivals[nxt].at_s <= now and len(batch) < max_batch_size:
            batch.append(nxt)
            nxt += 1
        for step in decoder.stream([items[i] for i in batch]):
            t = time.perf_counter() - t0
            for i, d in zip(batch, step):
                if d is not None:
                    _record(seen[i], d, t)
    return _summary(seen, time.perf_counter() - t0, batches={"max_batch_size": max_batch_size})


def run_continuous(loaded, arrivals: Sequence[Arrival], *, config) -> dict[str, Any]:
    """The continuous-batching engine: each request joins the running batch when it arrives."""
    from aifactory.serve.engine_cb import ContinuousEngine

    engine = ContinuousEngine(loaded, config=config)
    items = _items(arrivals)
    seen: dict[int, _Seen] = {}
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(arrivals) or engine.has_work:
        now = time.perf_counter() - t0
        while nxt < len(arrivals) and arrivals[nxt].at_s <= now:
            seen[engine.add(items[nxt])] = _Seen(arrivals[nxt])
            nxt += 1
        if not engine.has_work:
            _wait_for(t0, arrivals[nxt].at_s)
            continue
        deltas = engine.step()
        t = time.perf_counter() - t0
        for rid, d in deltas.items():
            _record(seen[rid], d, t)
    s = engine.stats
    return _summary(list(seen.values()), time.perf_counter() - t0,
                    batches={"steps": s.steps, "preemptions": s.preemptions, "largest_batch": s.largest_batch,
                             "tokens_computed": s.tokens_computed})


def _record(s: _Seen, delta, t: float) -> None:
    if delta.tokens and s.first_s is None:
        s.first_s = t
    s.tokens += len(delta.tokens)
    if delta.result is not None:
        s.end_s = t
        s.error = delta.result.error


def _summary(seen: list[_Seen], wall_s: float, *, batches: dict[str, Any]) -> dict[str, Any]:
    """Throughput and latency figures of one run, overall and per SLO class (``<class>_ttft_p99_ms``, ...)."""
    ok = [s for s in seen if s.error is None and s.end_s is not None]
    out: dict[str, Any] = {
        "num_requests": len(seen), "num_ok": len(ok), "num_errors": len(seen) - len(ok), "wall_s": wall_s,
        "tokens_generated": sum(s.tokens for s in ok),
        "tokens_per_s": sum(s.tokens for s in ok) / wall_s if wall_s > 0 else None,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "replica_cpu_s": wall_s,  # one engine thread held its core for the run (torch threads = 1)
    }
    out |= _latencies(ok, "")
    for cls in sorted({s.arrival.slo_class for s in ok}):
        out |= _latencies([s for s in ok if s.arrival.slo_class == cls], f"{cls}_")
    return out | batches


def _latencies(ok: list[_Seen], prefix: str) -> dict[str, float | None]:
    ttft = [1000 * (s.first_s - s.arrival.at_s) for s in ok if s.first_s is not None]
    e2e = [1000 * (s.end_s - s.arrival.at_s) for s in ok]
    return {f"{prefix}ttft_p50_ms": percentile(ttft, 50), f"{prefix}ttft_p99_ms": percentile(ttft, 99),
            f"{prefix}p50_ms": percentile(e2e, 50), f"{prefix}p95_ms": percentile(e2e, 95),
            f"{prefix}p99_ms": percentile(e2e, 99)}
