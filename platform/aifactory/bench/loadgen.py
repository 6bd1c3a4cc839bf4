"""A bounded closed-loop HTTP load: ``concurrency`` clients send ``num_requests`` requests, then stop.

Latency is measured per request on the client (``perf_counter`` around the whole exchange), so it includes
the proxy, the queue and the batch wait. Throughput counts successful answers over the measured wall time.
Non-2xx answers and client errors are counted, never silently dropped from the figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    num_ok: int = 0
    num_errors: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def metrics(self) -> dict[str, float | int | None]:
        from aifactory.bench.stats import percentile

        lat = self.latencies_ms
        total = self.num_ok + self.num_errors
        return {
            "throughput_rps": self.num_ok / self.wall_s if self.wall_s > 0 else None,
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "mean_ms": sum(lat) / len(lat) if lat else None,
            "num_requests": total,
            "num_ok": self.num_ok,
            "num_errors": self.num_errors,
            "error_rate": self.num_errors / total if total else None,
            "wall_s": self.wall_s,
        }


async def _drive(url: str, make_body: Callable[[int], Any], *, num_requests: int, concurrency: int,
                 timeout_s: float, headers: dict[str, str] | None,
                 on_ok: Callable[[Any], None] | None) -> LoadResult:
    import httpx

    result = LoadResult()
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < num_requests:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                resp = await http.post(url, json=make_body(i), headers=headers)
                key = str(resp.status_code)
                ok = 200 <= resp.status_code < 300
            except httpx.HTTPError as err:
                key, ok = type(err).__name__, False
            result.status_counts[key] = result.status_counts.get(key, 0) + 1
            if ok:
                result.num_ok += 1
                result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                if on_ok is not None:  # after the clock stopped: reading the answer is not part of its latency
                    on_ok(resp)
            else:
                result.num_errors += 1

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(min(concurrency, num_requests))))
        result.wall_s = time.perf_counter() - t0
    return result


def drive_load(url: str, make_body: Callable[[int], Any], *, num_requests: int, concurrency: int,
               timeout_s: float = 30.0, headers: dict[str, str] | None = None,
               on_ok: Callable[[Any], None] | None = None) -> LoadResult:
    """Send ``num_requests`` POSTs of ``make_body(i)`` to ``url`` with ``concurrency`` in flight;
    ``on_ok(response)`` sees each successful answer (e.g. to count the tokens it reports)."""
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        # Benchmarks load the local cluster only; never point a load generator at someone else's host.
        raise ValueError(f"load target must be on 127.0.0.1, got {url}")
    return asyncio.run(_drive(url, make_body, num_requests=num_requests, concurrency=concurrency, timeout_s=timeout_s,
                              headers=headers, on_ok=on_ok))
