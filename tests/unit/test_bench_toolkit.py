"""The measurement toolkit without Ray: success classification, closed vs open loop against a real HTTP
server on 127.0.0.1 (aiohttp, in process), percentiles and ratio CIs, benchmark run folders and compare."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from aifactory.bench import loadgen
from aifactory.bench.loadgen import LoadResult, classify, closed_loop, open_loop, open_loop_offsets
from aifactory.bench.stats import percentile, ratio_summary


@pytest.mark.parametrize("status,outcome", [
    (200, "ok"), (201, "ok"), (204, "ok"),
    (429, "rejected"),
    (500, "server_error"), (503, "server_error"), (504, "server_error"),
    (loadgen.TRANSPORT, "transport_error"),
    (400, "client_error"), (404, "client_error"), (408, "client_error"), (301, "client_error"),
])
def test_one_definition_of_success_2xx_ok_429_rejected_5xx_and_transport_errors(status, outcome):
    assert classify(status) == outcome


def test_summary_counts_outcomes_apart_and_figures_only_successes():
    r = LoadResult(wall_s=2.0)
    for i, (status, lat) in enumerate([(200, 0.010), (200, 0.020), (204, 0.030), (429, 0.001), (503, 5.0),
                                       (0, 9.0), (404, 0.002)]):
        r.record(float(i), lat, status)
    m = r.metrics()
    assert (m["num_requests"], m["num_ok"], m["num_rejected"], m["num_server_errors"], m["num_transport_errors"],
            m["num_client_errors"], m["num_errors"]) == (7, 3, 1, 1, 1, 1, 3)
    assert m["throughput_rps"] == pytest.approx(1.5)  # 3 successes over 2 s: a 429 or a 503 is no throughput
    assert m["p99_ms"] == pytest.approx(29.8)  # the 5 s 503 and the 9 s transport error are not latencies
    assert m["reject_p99_ms"] == pytest.approx(1.0)
    assert m["error_rate"] == pytest.approx(4 / 7) and m["rejected_rate"] == pytest.approx(1 / 7)
    assert r.status_counts == {"200": 2, "204": 1, "429": 1, "503": 1, "transport": 1, "404": 1}


def test_percentile_interpolates_linearly_like_numpy_and_is_none_when_empty():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile([], 99) is None and percentile([float("nan"), None], 50) is None  # type: ignore[list-item]
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile(xs, 101)


def test_open_loop_schedule_is_fixed_by_rate_not_by_answers():
    assert open_loop_offsets(10.0, 0.5) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="rate_rps"):
        open_loop_offsets(0.0, 1.0)


def test_ratio_summary_pairs_rounds_and_bootstraps_their_median():
    on, off = [98.0, 101.0, 99.0, 97.0], [100.0, 100.0, 100.0, 100.0]
    s = ratio_summary(on, off)
    assert s.n == 4 and s.median == pytest.approx(0.985) and s.method == "bootstrap-paired-ratio"
    assert s.ci_low <= s.median <= s.ci_high and 0.97 <= s.ci_low and s.ci_high <= 1.01
    assert ratio_summary([1.0, None], [2.0, 2.0]).n == 1  # an unmeasured round is left out, not counted as 0
    with pytest.raises(ValueError, match="as many numerators"):
        ratio_summary([1.0], [1.0, 2.0])


# ---- against a real HTTP server on 127.0.0.1 -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _with_server(delay_s: float, fn):
    """Run ``fn(url)`` against an aiohttp server answering each POST after ``delay_s`` with the status in its
    body (default 200), counting the requests it holds at once."""
    from aiohttp import web

    held = {"now": 0, "peak": 0}

    async def handle(request):
        body = await request.json()
        held["now"] += 1
        held["peak"] = max(held["peak"], held["now"])
        try:
            await asyncio.sleep(delay_s)
        finally:
            held["now"] -= 1
        return web.json_response({"usage": {"prompt_tokens": 3}}, status=int(body.get("status", 200)))

    app = web.Application()
    app.router.add_post("/x", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        return await fn(f"http://127.0.0.1:{port}/x"), held
    finally:
        await runner.cleanup()


def test_closed_loop_never_has_more_than_concurrency_in_flight_and_sends_exactly_total():
    async def go(url):
        return await closed_loop(url, lambda i: {}, concurrency=3, total=12)

    r, held = asyncio.run(_with_server(0.05, go))
    m = r.metrics()
    assert m["num_requests"] == 12 and m["num_ok"] == 12
    assert r.peak_in_flight == 3 and held["peak"] == 3
    assert m["wall_s"] >= 4 * 0.05  # 12 requests, 3 at a time, 50 ms each


def test_open_loop_sends_at_the_rate_whether_or_not_answers_came_back():
    async def go(url):
        return await open_loop(url, lambda i: {}, rate_rps=40.0, duration_s=0.5)

    r, held = asyncio.run(_with_server(0.3, go))
    m = r.metrics()
    assert m["num_requests"] == 20 and m["num_ok"] == 20 and m["offered_rps"] == 40.0
    # Every answer takes 0.3 s, so a generator that waited for answers could not send 20 in ~0.5 s; at 40/s
    # about 12 are outstanding at once.
    assert r.send_s < 0.6 and m["sent_rps"] == pytest.approx(40.0, rel=0.25)
    assert r.peak_in_flight >= 8 and held["peak"] >= 8


def test_statuses_from_the_wire_are_classified_and_answers_reach_on_ok():
    seen = []
    statuses = [200, 429, 503, 404, 200]

    async def go(url):
        return await closed_loop(url, lambda i: {"status": statuses[i]}, concurrency=2, total=len(statuses),
                                 on_ok=lambda a: seen.append(a.json()["usage"]["prompt_tokens"]))

    r, _ = asyncio.run(_with_server(0.0, go))
    m = r.metrics()
    assert (m["num_ok"], m["num_rejected"], m["num_server_errors"], m["num_client_errors"]) == (2, 1, 1, 1)
    assert seen == [3, 3]  # on_ok sees successes only


def test_a_refused_connection_is_a_transport_error_never_a_success():
    port = _free_port()  # nothing listens here
    r = loadgen.drive_load(f"http://127.0.0.1:{port}/x", lambda i: {}, num_requests=3, concurrency=1, timeout_s=5)
    m = r.metrics()
    assert m["num_transport_errors"] == 3 and m["num_ok"] == 0 and m["throughput_rps"] == 0.0
    assert m["p99_ms"] is None and "ClientConnectorError" in r.status_counts


def test_targets_other_than_loopback_are_refused_before_any_request():
    with pytest.raises(ValueError, match="127.0.0.1"):
        asyncio.run(open_loop("http://10.1.2.3:8000/x", lambda i: {}, rate_rps=1, duration_s=1))


# ---- results: benchmark run folders, priced, comparable ---------------------------------------------------

def _load(tput: float, p99: float, wall: float = 10.0) -> dict:
    n = int(tput * wall)
    return {"throughput_rps": tput, "p50_ms": p99 / 2, "p95_ms": p99 * 0.9, "p99_ms": p99, "num_ok": n,
            "num_requests": n, "error_rate": 0.0, "wall_s": wall, "replica_cpu_s": 0.5 * wall}


def test_benchmark_runs_are_priced_recorded_with_context_and_compared(tmp_path):
    from aifactory.bench.compare import compare_runs
    from aifactory.bench.results import ResultStore, interleaved, record_benchmark
    from aifactory.home import FactoryHome

    order = []
    runs = interleaved({"a": lambda: order.append("a") or _load(100, 50),
                        "b": lambda: order.append("b") or _load(50, 90)}, repeats=3, log=lambda m: None)
    assert order == ["a", "b", "a", "b", "a", "b"]
    run, trials, folder = record_benchmark("toy", runs, out_dir=tmp_path / "base", kind="serve-toy", params={"x": 1},
                                           summary={"ratio": 2.0}, started_at=1.0)
    assert (folder / "run.json").is_file() and len(trials) == 6 and run.summary == {"ratio": 2.0}
    assert run.pricing["price_book_version"] and run.context["load_average_1m"] is not None
    assert trials[0].metrics["cost_per_1k_requests_usd"] > 0  # 5 replica CPU-seconds over 1000 answers
    slower = {"a": [_load(t, 50) for t in (80, 81, 79)], "b": runs["b"]}
    record_benchmark("toy", slower, out_dir=tmp_path / "cand", kind="serve-toy", params={}, started_at=2.0)
    store = ResultStore(FactoryHome.from_env(tmp_path / "home"))
    cmp = compare_runs(store.get(str(tmp_path / "base" / "toy")), store.get(str(tmp_path / "cand" / "toy")))
    # Fewer answers from the same CPU-seconds: slower and dearer per request; "b" did not change.
    assert {(c.config_id, c.metric) for c in cmp.regressions} == {
        ("a", "throughput_rps"), ("a", "cost_per_1k_requests_usd"), ("a", "requests_per_usd")}
    json.dumps(cmp.to_dict(), default=str)


def test_a_variant_without_repeats_is_refused_naming_it(tmp_path):
    from aifactory.bench.results import record_benchmark

    with pytest.raises(ValueError, match="'b': 0"):
        record_benchmark("toy", {"a": [_load(1, 1)], "b": []}, out_dir=tmp_path, kind="serve-toy", params={},
                         started_at=0.0)
