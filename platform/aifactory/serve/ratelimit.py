"""Per-tenant token buckets: a request over its tenant's rate gets 429 with the seconds until a token frees."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from aifactory.serve.config import RateLimit


class TokenBucket:
    def __init__(self, rps: float, burst: int, *, now: float):
        self.rps = rps
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if admitted, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rps)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rps


class TenantRateLimiter:
    """One bucket per tenant; ``tenant_limits`` override ``default`` (None = unlimited)."""

    def __init__(self, default: RateLimit | None, tenant_limits: Mapping[str, RateLimit] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, max_tenants: int = 10_000):
        self.default = default
        self.tenant_limits = dict(tenant_limits or {})
        self.clock = clock
        self.max_tenants = max_tenants
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, tenant: str) -> float:
        """0.0 if admitted; else the Retry-After in seconds (never below 1, as HTTP wants whole seconds)."""
        limit = self.tenant_limits.get(tenant, self.default)
        if limit is None:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= self.max_tenants:  # bound memory against many made-up tenants
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[tenant] = TokenBucket(limit.rps, limit.burst, now=now)
        wait = bucket.take(now)
        return 0.0 if wait == 0.0 else float(max(1, math.ceil(wait)))
