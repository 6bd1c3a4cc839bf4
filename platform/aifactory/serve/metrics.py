"""Per-tenant serving counters: Ray metrics (for Prometheus) and a usage book (for cost accounting).

Metric names are a contract with cost accounting (see the README's "Serving metrics"): Ray exports them
with its ``ray_`` prefix. :class:`UsageRecorder` keeps the same counts per replica and pushes the deltas
to the named :class:`~aifactory.serve.usage.UsageBook` actor about twice a second, so
``aifactory.serve.usage.tenant_usage(app)`` works without Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

logger = logging.getLogger(__name__)

REQUESTS = "aifactory_serve_requests_total"
PROCESSING = "aifactory_serve_processing_seconds_total"
TOKENS = "aifactory_serve_tokens_total"
CACHE_HITS = "aifactory_serve_cache_hits_total"
CACHE_LOOKUPS = "aifactory_serve_cache_lookups_total"
MODEL_BATCH = "aifactory_serve_model_batch_size"  # items per model call (Serve's own batch size counts gathers)


class LatencyWindow:
    """The last ``size`` latencies, for the p95 the autoscaling policy reads."""

    def __init__(self, size: int = 256, max_age_s: float = 30.0):
        self._values: deque[tuple[float, float]] = deque(maxlen=size)
        self.max_age_s = max_age_s

    def observe(self, seconds: float) -> None:
        self._values.append((time.monotonic(), seconds))

    def p95(self) -> float:
        now = time.monotonic()
        vals = sorted(v for t, v in self._values if now - t <= self.max_age_s)
        if not vals:
            return 0.0
        return vals[min(len(vals) - 1, int(0.95 * len(vals)))]


class UsageRecorder:
    """Counts requests, processing seconds, tokens and cache use per tenant in one replica."""

    def __init__(self, application: str, deployment: str, *, flush_interval_s: float = 0.5):
        from ray.util import metrics

        self.application = application
        self.deployment = deployment
        self.flush_interval_s = flush_interval_s
        self._requests = metrics.Counter(REQUESTS, description="Serve requests by tenant and HTTP status.",
                                         tag_keys=("tenant", "application", "deployment", "status"))
        self._processing = metrics.Counter(PROCESSING, description="Replica processing seconds by tenant.",
                                           tag_keys=("tenant", "application", "deployment"))
        self._tokens = metrics.Counter(TOKENS, description="Prompt and completion tokens by tenant.",
                                       tag_keys=("tenant", "application", "deployment", "kind"))
        self._hits = metrics.Counter(CACHE_HITS, description="Cache hits by tenant and cache.",
                                     tag_keys=("tenant", "application", "cache"))
        self._lookups = metrics.Counter(CACHE_LOOKUPS, description="Cache lookups by tenant and cache.",
                                        tag_keys=("tenant", "application", "cache"))
        self._model_batch = metrics.Histogram(
            MODEL_BATCH, description="Items per model call, as the replica's batch lane ran them.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("application", "deployment"))
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, float]] = {}
        self._task: asyncio.Task | None = None
        self._book = None

    def _base(self, tenant: str) -> dict[str, str]:
        return {"tenant": tenant, "application": self.application, "deployment": self.deployment}

    def _add(self, tenant: str, key: str, value: float) -> None:
        with self._lock:
            row = self._pending.setdefault(tenant, {})
            row[key] = row.get(key, 0.0) + value

    def model_call(self, items: int) -> None:
        self._model_batch.observe(items, tags={"application": self.application, "deployment": self.deployment})

    def request(self, tenant: str, status: int, processing_s: float) -> None:
        self._requests.inc(1, tags=self._base(tenant) | {"status": str(status)})
        self._processing.inc(processing_s, tags=self._base(tenant))
        self._add(tenant, "requests", 1)
        self._add(tenant, "processing_s", processing_s)
        if 200 <= status < 300:  # the requests unit costs divide by: answered ones only
            self._add(tenant, "answered", 1)
        elif status == 429:  # refused by admission or a rate limit: counted apart, not billed as served
            self._add(tenant, "rejected", 1)
        if status >= 400:
            self._add(tenant, "errors", 1)

    def tokens(self, tenant: str, *, prompt: int, completion: int) -> None:
        if prompt:
            self._tokens.inc(prompt, tags=self._base(tenant) | {"kind": "prompt"})
        if completion:
            self._tokens.inc(completion, tags=self._base(tenant) | {"kind": "completion"})
        self._add(tenant, "tokens", prompt + completion)
        self._add(tenant, "prompt_tokens", prompt)
        self._add(tenant, "completion_tokens", completion)

    def cache(self, tenant: str, cache: str, hit: bool) -> None:
        tags = {"tenant": tenant, "application": self.application, "cache": cache}
        self._lookups.inc(1, tags=tags)
        self._add(tenant, f"cache_{cache}_lookups", 1)
        if hit:
            self._hits.inc(1, tags=tags)
            self._add(tenant, f"cache_{cache}_hits", 1)

    def start(self) -> None:
        """Start the periodic flush (call from the replica's event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # the book may be restarting; deltas stay pending and go next time
                logger.warning("usage flush failed; will retry", exc_info=True)

    async def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        from aifactory.serve.usage import get_book

        try:
            if self._book is None:
                self._book = get_book()
            await self._book.record.remote(self.application, pending)
        except Exception:
            with self._lock:  # put the deltas back: usage is billed, never dropped
                for tenant, row in pending.items():
                    for k, v in row.items():
                        self._add_unlocked(tenant, k, v)
            self._book = None
            raise

    def _add_unlocked(self, tenant: str, key: str, value: float) -> None:
        row = self._pending.setdefault(tenant, {})
        row[key] = row.get(key, 0.0) + value


ENGINE_TTFT = "aifactory_serve_engine_ttft_seconds"
ENGINE_TPOT = "aifactory_serve_engine_time_per_output_token_seconds"
ENGINE_RUNNING = "aifactory_serve_engine_running_seqs"
ENGINE_WAITING = "aifactory_serve_engine_waiting_seqs"
ENGINE_KV_IN_USE = "aifactory_serve_engine_kv_blocks_in_use"
ENGINE_KV_TOTAL = "aifactory_serve_engine_kv_blocks"
ENGINE_PREEMPTIONS = "aifactory_serve_engine_preemptions_total"
ENGINE_STEP_TOKENS = "aifactory_serve_engine_tokens_per_step"
_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class EngineMetrics:
    """The continuous engine's signals of one replica, by application and deployment (latencies also by tenant).

    :meth:`step` is called by the engine loop's worker thread after every step and only adds to plain
    numbers under a lock (a step takes milliseconds; recording Ray metrics in it would slow every request);
    :meth:`flush`, on the replica's event loop about twice a second, hands them to Ray's metrics. Latencies
    (:meth:`request`) are recorded on the event loop as each answer ends."""

    def __init__(self, application: str, deployment: str, *, flush_interval_s: float = 0.5):
        from ray.util import metrics

        self.tags = {"application": application, "deployment": deployment}
        keys = ("application", "deployment")
        self._ttft = metrics.Histogram(ENGINE_TTFT, description="Time to first token (arrival at the engine to "
                                       "its first sampled token).", boundaries=_LATENCY_BOUNDS,
                                       tag_keys=("tenant", *keys))
        self._tpot = metrics.Histogram(ENGINE_TPOT, description="Time per output token after the first.",
                                       boundaries=_LATENCY_BOUNDS, tag_keys=("tenant", *keys))
        self._running = metrics.Gauge(ENGINE_RUNNING, description="Sequences in the running batch.", tag_keys=keys)
        self._waiting = metrics.Gauge(ENGINE_WAITING, description="Sequences waiting for admission.", tag_keys=keys)
        self._kv = metrics.Gauge(ENGINE_KV_IN_USE, description="KV-cache blocks held by sequences.", tag_keys=keys)
        self._kv_total = metrics.Gauge(ENGINE_KV_TOTAL, description="KV-cache blocks of the replica.", tag_keys=keys)
        self._preempt = metrics.Counter(ENGINE_PREEMPTIONS, description="Sequences preempted (recomputed later).",
                                        tag_keys=keys)
        self._step_tokens = metrics.Histogram(ENGINE_STEP_TOKENS, description="Tokens one engine step ran.",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
                                              tag_keys=keys)
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._last = None  # the latest StepSample
        self._step_sizes: deque[int] = deque(maxlen=4096)
        self._preemptions = 0
        self._task: asyncio.Task | None = None

    def step(self, sample) -> None:
        """One engine step (an :class:`aifactory.serve.engine_loop.StepSample`); any thread."""
        with self._lock:
            self._last = sample
            self._step_sizes.append(sample.tokens)
            self._preemptions += sample.preemptions

    def request(self, tenant: str, timings: dict, completion_tokens: int) -> None:
        """An answer ended: its time to first token and time per output token (from the engine's timings)."""
        ttft, total = timings.get("ttft_s"), timings.get("total_s")
        tags = self.tags | {"tenant": tenant}
        if ttft is not None:
            self._ttft.observe(ttft, tags=tags)
            if total is not None and completion_tokens > 1:
                self._tpot.observe((total - ttft) / (completion_tokens - 1), tags=tags)

    def snapshot(self) -> dict:
        """The latest step's gauges (for ``info`` and the autoscaling stats)."""
        with self._lock:
            s = self._last
        if s is None:
            return {"running": 0, "waiting": 0, "kv_blocks_in_use": 0}
        return {"running": s.running, "waiting": s.waiting, "kv_blocks_in_use": s.kv_blocks_in_use}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            last, sizes, preempted = self._last, list(self._step_sizes), self._preemptions
            self._step_sizes.clear()
            self._preemptions = 0
        if last is None:
            return
        self._running.set(last.running, tags=self.tags)
        self._waiting.set(last.waiting, tags=self.tags)
        self._kv.set(last.kv_blocks_in_use, tags=self.tags)
        self._kv_total.set(last.kv_blocks, tags=self.tags)
        if preempted:
            self._preempt.inc(preempted, tags=self.tags)
        for n in sizes:
            self._step_tokens.observe(n, tags=self.tags)
