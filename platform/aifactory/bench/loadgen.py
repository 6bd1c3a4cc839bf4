"""The factory's one HTTP load generator: closed loop and open loop, one definition of success.

Every figure of a load (benchmark trials, the ``benchmarks/`` scripts, the serve stage of ``factory run``)
comes from here, so "throughput" and "p99" mean the same thing everywhere:

- **Success is a 2xx answer** (:func:`classify`). 429 (admission control, rate limits) is a *rejection*;
  5xx (503 full queue, 504 model timeout), a request that got no HTTP answer at all (refused or reset
  connection, client timeout) and any other status are *errors*, each counted apart. Latency percentiles
  and throughput are over successful answers only; rejections have their own latency (how fast the excess
  is turned away). Before this module the serve benchmarks counted only 200 and the sweeps any 2xx.
- **Closed loop** (:func:`closed_loop`): ``concurrency`` clients, each sending its next request when its
  previous answer arrived, until ``total`` requests are done. It never offers more than the server keeps up
  with, so it measures capacity, not overload.
- **Open loop** (:func:`open_loop`): request ``i`` starts at ``i / rate_rps`` seconds
  (:func:`open_loop_offsets`) whether or not earlier ones were answered (at most ``max_in_flight``
  outstanding), which is what arrivals from many independent users look like, and what overload needs.

Latency is the client's ``perf_counter`` around the whole exchange (proxy, queue and batch wait included).
aiohttp rather than httpx: the generator shares the cores with the server, so its cost per request matters.
Targets must be on 127.0.0.1: benchmarks never load someone else's host.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aifactory.bench.stats import percentile

OK, REJECTED, SERVER_ERROR, TRANSPORT_ERROR, CLIENT_ERROR = "ok", "rejected", "server_error", "transport_error", \
    "client_error"
TRANSPORT = 0  # the status recorded for a request that got no HTTP answer


def classify(status: int) -> str:
    """The outcome of one request from its HTTP status (``TRANSPORT`` = no answer): the one rule of success."""
    if 200 <= status < 300:
        return OK
    if status == 429:
        return REJECTED
    if 500 <= status < 600:
        return SERVER_ERROR
    if status == TRANSPORT:
        return TRANSPORT_ERROR
    return CLIENT_ERROR


def open_loop_offsets(rate_rps: float, duration_s: float) -> list[float]:
    """When (seconds after the start) each request of an open loop is sent: ``i / rate_rps``."""
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError(f"rate_rps and duration_s must be > 0, got rate_rps={rate_rps}, duration_s={duration_s}")
    return [i / rate_rps for i in range(int(rate_rps * duration_s))]


def poisson_offsets(rate_rps: float, num_requests: int, *, seed: int = 0) -> list[float]:
    """When each of ``num_requests`` Poisson arrivals at ``rate_rps`` comes (seconds after the start): gaps drawn
    from an exponential distribution of mean ``1 / rate_rps``, seeded, so every variant of a benchmark sees the
    same arrivals."""
    import random

    if rate_rps <= 0 or num_requests < 0:
        raise ValueError(f"rate_rps must be > 0 and num_requests >= 0, got {rate_rps} and {num_requests}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(rate_rps)
    return out


@dataclass(frozen=True)
class Answer:
    """What ``on_ok`` sees of a successful answer (read after the clock stopped)."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LoadResult:
    """Every request of one load: when it was sent, how long it took, its status. Figures: :meth:`metrics`."""

    sent_s: list[float] = field(default_factory=list)  # perf_counter at send
    latencies_s: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # transport errors by exception type
    wall_s: float = 0.0
    offered_rps: float | None = None  # open loop: the rate asked for
    send_s: float | None = None  # open loop: first send to last send (longer than planned: the generator lagged)
    in_flight: int = 0
    peak_in_flight: int = 0  # most requests outstanding at once: the server's ongoing + queued, seen from outside
    started_at: float | None = None  # Unix seconds the measured load began and ended: what its cost is metered over
    ended_at: float | None = None

    def record(self, sent: float, latency_s: float, status: int) -> None:
        self.sent_s.append(sent)
        self.latencies_s.append(latency_s)
        self.statuses.append(status)

    def _of(self, outcome: str) -> list[int]:
        return [i for i, s in enumerate(self.statuses) if classify(s) == outcome]

    @property
    def num_ok(self) -> int:
        return len(self._of(OK))

    @property
    def status_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.statuses:
            key = str(s) if s != TRANSPORT else "transport"
            out[key] = out.get(key, 0) + 1
        for name, n in self.errors.items():
            out[name] = n
        return out

    def metrics(self) -> dict[str, Any]:
        return summarize(self)


def summarize(r: LoadResult) -> dict[str, Any]:
    """The figures of one load. Percentiles and throughput are of successful (2xx) answers only."""
    ok = r._of(OK)
    rejected = r._of(REJECTED)
    counts = {o: len(r._of(o)) for o in (SERVER_ERROR, TRANSPORT_ERROR, CLIENT_ERROR)}
    n = len(r.statuses)
    lat = [r.latencies_s[i] * 1e3 for i in ok]
    rej = [r.latencies_s[i] * 1e3 for i in rejected]
    return {
        "num_requests": n,
        "num_ok": len(ok),
        "num_rejected": len(rejected),
        "num_server_errors": counts[SERVER_ERROR],
        "num_transport_errors": counts[TRANSPORT_ERROR],
        "num_client_errors": counts[CLIENT_ERROR],
        "num_errors": sum(counts.values()),  # everything that is neither a success nor a rejection
        "error_rate": (n - len(ok)) / n if n else None,  # share not answered 2xx: rejections and errors
        "rejected_rate": len(rejected) / n if n else None,
        "throughput_rps": len(ok) / r.wall_s if r.wall_s > 0 else None,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else None,
        "reject_p99_ms": percentile(rej, 99),
        "wall_s": r.wall_s,
        "offered_rps": r.offered_rps,
        # Requests actually started per second: below offered_rps when the generator itself fell behind.
        "sent_rps": (n - 1) / r.send_s if r.send_s and n > 1 else None,
        "peak_in_flight": r.peak_in_flight,
        "answered_rps": _answer_rate([r.sent_s[i] + r.latencies_s[i] for i in ok]),
        **_halves([r.sent_s[i] for i in ok], [r.latencies_s[i] for i in ok]),
    }


def _answer_rate(ends: list[float]) -> float | None:
    """Answers per second between the first and the last answer: the rate the server kept up, without the
    drain of the last requests that ``throughput_rps`` (answers over the whole wall time) includes."""
    ends = sorted(ends)
    return (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None


def _halves(sent: list[float], lat_s: list[float]) -> dict[str, Any]:
    """Median and p99 latency of the answers sent in the first and in the second half of the run: a queue
    that keeps growing (load above capacity) shows as a second half much slower than the first."""
    if len(sent) < 4:
        return {k: None for k in ("p50_first_half_ms", "p50_second_half_ms", "p99_first_half_ms",
                                  "p99_second_half_ms", "answers_per_half")}
    mid = percentile(sent, 50)
    first = [lat * 1e3 for t, lat in zip(sent, lat_s) if t <= mid]
    second = [lat * 1e3 for t, lat in zip(sent, lat_s) if t > mid]
    return {"p50_first_half_ms": percentile(first, 50), "p50_second_half_ms": percentile(second, 50),
            "p99_first_half_ms": percentile(first, 99), "p99_second_half_ms": percentile(second, 99),
            "answers_per_half": min(len(first), len(second))}


def _check_target(url: str) -> None:
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        # Benchmarks load the local cluster only; never point a load generator at someone else's host.
        raise ValueError(f"load target must be on 127.0.0.1, got {url}")


async def _one(session, url: str, body: Any, headers: dict, out: LoadResult,
               on_ok: Callable[[Answer], None] | None) -> None:
    import aiohttp

    t0 = time.perf_counter()
    out.in_flight += 1
    out.peak_in_flight = max(out.peak_in_flight, out.in_flight)
    data = b""
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:  # no answer: an error, never a success
        status = TRANSPORT
        out.errors[type(err).__name__] = out.errors.get(type(err).__name__, 0) + 1
    finally:
        out.in_flight -= 1
    out.record(t0, time.perf_counter() - t0, status)
    if on_ok is not None and classify(status) == OK:
        on_ok(Answer(status, data))


def _session(connections: int, timeout_s: float):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=False)


async def closed_loop(url: str, make_body: Callable[[int], Any], *, concurrency: int, total: int,
                      headers: dict | None = None, timeout_s: float = 60.0,
                      on_ok: Callable[[Answer], None] | None = None) -> LoadResult:
    """``concurrency`` clients send ``total`` POSTs of ``make_body(i)``, each waiting for its answer."""
    _check_target(url)
    if concurrency < 1 or total < 1:
        raise ValueError(f"concurrency and total must be >= 1, got concurrency={concurrency}, total={total}")
    out = LoadResult()
    counter = iter(range(total))
    async with _session(concurrency, timeout_s) as session:
        async def client() -> None:
            for i in counter:
                await _one(session, url, make_body(i), headers or {}, out, on_ok)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, total))))
        out.wall_s = time.perf_counter() - t0
    return out


async def open_loop(url: str, make_body: Callable[[int], Any], *, rate_rps: float, duration_s: float,
                    max_in_flight: int = 512, headers: dict | None = None, timeout_s: float = 60.0,
                    on_ok: Callable[[Answer], None] | None = None) -> LoadResult:
    """POSTs of ``make_body(i)`` started at :func:`open_loop_offsets`, answered or not (at most
    ``max_in_flight`` outstanding: beyond that the generator waits, which ``sent_rps`` shows)."""
    _check_target(url)
    offsets = open_loop_offsets(rate_rps, duration_s)
    out = LoadResult(offered_rps=rate_rps)
    sem = asyncio.Semaphore(max_in_flight)
    async with _session(max_in_flight, timeout_s) as session:
        tasks = []
        t0 = time.perf_counter()
        for i, offset in enumerate(offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()

            async def run(i: int = i) -> None:
                try:
                    await _one(session, url, make_body(i), headers or {}, out, on_ok)
                finally:
                    sem.release()

            tasks.append(asyncio.create_task(run()))
        out.send_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        out.wall_s = time.perf_counter() - t0
    return out


def drive_load(url: str, make_body: Callable[[int], Any], *, num_requests: int, concurrency: int,
               timeout_s: float = 30.0, headers: dict[str, str] | None = None,
               on_ok: Callable[[Answer], None] | None = None) -> LoadResult:
    """A closed loop from synchronous code (a Tune trial): ``num_requests`` POSTs, ``concurrency`` in flight;
    ``on_ok(answer)`` sees each successful answer (e.g. to count the tokens it reports)."""
    _check_target(url)
    return asyncio.run(closed_loop(url, make_body, concurrency=concurrency, total=num_requests, headers=headers,
                                   timeout_s=timeout_s, on_ok=on_ok))


def below_saturation(s: dict, *, capacity: int, keep_up: float = 0.95, growth: float = 1.5,
                     slack_ms: float = 50.0, min_answers: int = 20) -> tuple[bool, str]:
    """Whether an open-loop point (the :func:`summarize` of an :func:`open_loop`) ran below saturation, and
    why not. ``capacity``: the admission bound (max ongoing + max queued).

    Below saturation means: nothing rejected or failed; the generator sent at the offered rate and the
    server answered at it (both >= ``keep_up`` of it; answers counted from the first to the last); the
    requests never filled the admission bound; and latency was stable: the median of the second half of
    the run no slower than ``growth`` x the first half's (+ ``slack_ms``), where a queue that grows for the
    whole run shows. (Medians, not p99s: a p99 of a few dozen answers is one answer, and one slow answer on
    shared cores is not a growing queue.) The stability check needs ``min_answers`` answers per half."""
    offered = s["offered_rps"]
    if s["num_rejected"] or s["num_errors"]:
        return False, f"{s['num_rejected']} rejected, {s['num_errors']} failed"
    if (s.get("sent_rps") or 0.0) < keep_up * offered:
        return False, f"the generator sent {s.get('sent_rps') or 0:.0f} of {offered:.0f} rps"
    if (s.get("answered_rps") or 0.0) < keep_up * offered:
        return False, f"answered {s.get('answered_rps') or 0:.1f} of {offered:.1f} rps"
    if s["peak_in_flight"] >= capacity:
        return False, f"{s['peak_in_flight']} in flight filled the admission bound ({capacity})"
    first, second = s.get("p50_first_half_ms"), s.get("p50_second_half_ms")
    if (first is not None and second is not None and (s.get("answers_per_half") or 0) >= min_answers
            and second > growth * first + slack_ms):
        return False, f"median latency grew from {first:.0f} ms (first half) to {second:.0f} ms (second half)"
    return True, "keeps up"


def find_saturation(run_at: Callable[[float], dict], *, start_rps: float, capacity: int, step: float = 1.2,
                    max_points: int = 14, log: Callable[[str], None] = print) -> tuple[float, list[dict]]:
    """S: the highest open-loop rate that runs :func:`below_saturation`, found by raising the rate by
    ``step`` from ``start_rps`` until a point fails twice in a row (halving first while even ``start_rps`` fails).
    Returns S and every point measured (each with ``keeps_up`` and ``reason``)."""
    points: list[dict] = []
    rate, best, retried = start_rps, None, False
    for _ in range(max_points):
        s = run_at(rate)
        ok, reason = below_saturation(s, capacity=capacity)
        points.append(s | {"keeps_up": ok, "reason": reason})
        log(f"  calibrate {rate:7.1f} rps offered: sent {s.get('sent_rps') or 0:6.1f}, answered "
            f"{s.get('answered_rps') or 0:6.1f} rps, p99 {s.get('p99_ms') or 0:6.0f} ms, median by half "
            f"{s.get('p50_first_half_ms') or 0:.0f}/{s.get('p50_second_half_ms') or 0:.0f} ms, peak in flight "
            f"{s['peak_in_flight']}, rejected {s['num_rejected']}: {reason}")
        if ok:
            best, retried = rate, False
            rate *= step
        elif best is None:
            rate /= 2
        elif not retried:
            retried = True  # one noisy point (the cores are shared) must not end the search: measure it again
        else:
            break
    if best is None:
        raise RuntimeError(f"no open-loop rate down to {rate:.1f} rps ran below saturation: {points[-1]['reason']}")
    return best, points
