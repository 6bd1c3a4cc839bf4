"""A bounded HTTP load generator for the serve stage and the benchmarks (closed loop or fixed rate).

Closed loop: ``concurrency`` clients, each sending its next request when the previous answer arrives,
until ``total`` requests are done. Open loop: requests start at ``rate_rps`` regardless of answers (with
at most ``max_in_flight`` outstanding), which is what overload needs. Latencies are per request,
wall-clock; figures come from :func:`summarize`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    ok_started_s: list[float] = field(default_factory=list)  # when each answered request was sent (perf_counter)
    statuses: list[int] = field(default_factory=list)
    reject_latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    offered_rps: float | None = None  # open loop: the rate asked for
    send_s: float | None = None  # open loop: time from the first send to the last (lag shows a generator behind)
    in_flight: int = 0
    peak_in_flight: int = 0  # most requests outstanding at once: the server's ongoing + queued, seen from outside

    def summary(self) -> dict:
        return summarize(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(r: LoadResult) -> dict:
    ok = r.latencies_s
    return {
        "requests": len(r.statuses),
        "ok": sum(1 for s in r.statuses if s == 200),
        "rejected": sum(1 for s in r.statuses if s in (429, 503)),
        "errors": sum(1 for s in r.statuses if s not in (200, 429, 503)),
        "throughput_rps": len(ok) / r.wall_s if r.wall_s else 0.0,
        "p50_ms": percentile(ok, 50) * 1e3,
        "p95_ms": percentile(ok, 95) * 1e3,
        "p99_ms": percentile(ok, 99) * 1e3,
        "reject_p99_ms": percentile(r.reject_latencies_s, 99) * 1e3 if r.reject_latencies_s else None,
        "wall_s": r.wall_s,
        "offered_rps": r.offered_rps,
        # Requests actually started per second: below offered_rps when the generator itself fell behind.
        "sent_rps": (len(r.statuses) - 1) / r.send_s if r.send_s and len(r.statuses) > 1 else None,
        "peak_in_flight": r.peak_in_flight,
        "answered_rps": _answer_rate(r),
        **_halves(r),
    }


def _answer_rate(r: LoadResult) -> float | None:
    """Answers per second between the first and the last answer: the rate the server kept up, without the
    drain of the last requests that ``throughput_rps`` (answers over the whole wall time) includes."""
    ends = sorted(t + lat for t, lat in zip(r.ok_started_s, r.latencies_s))
    return (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None


def _halves(r: LoadResult) -> dict:
    """Median and p99 latency of the requests sent in the first and in the second half of the run: a queue
    that keeps growing (load above capacity) shows as a second half much slower than the first."""
    if len(r.ok_started_s) < 4:
        return {k: None for k in ("p50_first_half_ms", "p50_second_half_ms", "p99_first_half_ms",
                                  "p99_second_half_ms", "answers_per_half")}
    mid = percentile(r.ok_started_s, 50)
    first = [lat for t, lat in zip(r.ok_started_s, r.latencies_s) if t <= mid]
    second = [lat for t, lat in zip(r.ok_started_s, r.latencies_s) if t > mid]
    return {"p50_first_half_ms": percentile(first, 50) * 1e3, "p50_second_half_ms": percentile(second, 50) * 1e3,
            "p99_first_half_ms": percentile(first, 99) * 1e3, "p99_second_half_ms": percentile(second, 99) * 1e3,
            "answers_per_half": min(len(first), len(second))}


async def _one(session, url: str, body: dict, headers: dict, out: LoadResult) -> None:
    t0 = time.perf_counter()
    out.in_flight += 1
    out.peak_in_flight = max(out.peak_in_flight, out.in_flight)
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            status = resp.status
    except Exception:  # a refused/reset connection counts as a failed request, never as a success
        status = 599
    finally:
        out.in_flight -= 1
    dt = time.perf_counter() - t0
    out.statuses.append(status)
    if status == 200:
        out.latencies_s.append(dt)
        out.ok_started_s.append(t0)
    elif status in (429, 503):
        out.reject_latencies_s.append(dt)


def _session(connections: int, timeout_s: float):
    # aiohttp rather than httpx: the generator shares the 2 cores with the server, so its cost per request matters.
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def closed_loop(url: str, make_body: Callable[[int], dict], *, concurrency: int, total: int,
                      headers: dict | None = None, timeout_s: float = 60.0) -> LoadResult:
    out = LoadResult()
    counter = iter(range(total))
    async with _session(concurrency, timeout_s) as session:
        async def worker():
            for i in counter:
                await _one(session, url, make_body(i), headers or {}, out)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out.wall_s = time.perf_counter() - t0
    return out


async def open_loop(url: str, make_body: Callable[[int], dict], *, rate_rps: float, duration_s: float,
                    max_in_flight: int = 512, headers: dict | None = None, timeout_s: float = 60.0) -> LoadResult:
    out = LoadResult(offered_rps=rate_rps)
    sem = asyncio.Semaphore(max_in_flight)
    async with _session(max_in_flight, timeout_s) as session:
        tasks = []
        t0 = time.perf_counter()
        n = int(rate_rps * duration_s)
        for i in range(n):
            delay = t0 + i / rate_rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()

            async def run(i=i):
                try:
                    await _one(session, url, make_body(i), headers or {}, out)
                finally:
                    sem.release()

            tasks.append(asyncio.create_task(run()))
        out.send_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        out.wall_s = time.perf_counter() - t0
    return out
