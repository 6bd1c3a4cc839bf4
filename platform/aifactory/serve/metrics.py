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
