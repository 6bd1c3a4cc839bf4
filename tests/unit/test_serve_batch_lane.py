"""BatchLane: one model call at a time, merging what waited (pure asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from aifactory.serve.batching import BatchLane


class SlowModel:
    """Doubles each item; every call takes ``call_s`` and records what it held."""

    def __init__(self, call_s: float = 0.05):
        self.call_s = call_s
        self.calls: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.calls.append(list(items))
        time.sleep(self.call_s)
        with self._lock:
            self.running -= 1
        return [2 * x for x in items]


async def submit_and_start(lane: BatchLane, items: list[int]) -> asyncio.Future:
    """Submit ``items`` and return once their call runs, so that what is submitted next has to wait for it."""
    fut = lane.submit(items)
    await asyncio.sleep(0.01)
    return fut


def test_requests_arriving_during_a_call_share_the_next_call():
    model = SlowModel(call_s=0.1)

    async def main():
        lane = BatchLane(model, max_items=64)
        first = await submit_and_start(lane, [0])  # the lane is idle: the call starts at once
        rest = [lane.submit([i]) for i in range(1, 21)]  # all arrive while call 1 runs
        return await first, await asyncio.gather(*rest), lane.stats

    first, rest, stats = asyncio.run(main())
    assert first == [0]
    assert rest == [[2 * i] for i in range(1, 21)]
    # Serve's gate would have run these as 20 calls (or one per batch window); the lane runs them as one.
    assert model.calls == [[0], list(range(1, 21))]
    assert (stats.calls, stats.items, stats.largest) == (2, 21, 20)
    assert model.most_running == 1


def test_a_call_never_exceeds_max_items_and_never_splits_a_request():
    model = SlowModel(call_s=0.05)

    async def main():
        lane = BatchLane(model, max_items=5)
        busy = await submit_and_start(lane, [100])
        futs = [lane.submit([10 * r + j for j in range(n)]) for r, n in enumerate([2, 2, 3, 1, 7])]
        out = await asyncio.gather(busy, *futs)
        return out

    out = asyncio.run(main())
    sizes = [len(c) for c in model.calls]
    assert sizes == [1, 4, 4, 7]  # 2+2 | 3+1 | 7 alone (larger than max_items, run whole)
    assert out[1:] == [[2 * (10 * r + j) for j in range(n)] for r, n in enumerate([2, 2, 3, 1, 7])]


def test_a_model_error_reaches_every_request_of_that_call_and_the_lane_keeps_running():
    calls = []

    def flaky(items):
        calls.append(list(items))
        if 13 in items:
            raise ValueError("bad input 13")
        return items

    async def main():
        lane = BatchLane(flaky, max_items=8)
        a, b = lane.submit([13]), lane.submit([1])  # submitted in one tick: one call holds both
        results = await asyncio.gather(a, b, return_exceptions=True)
        c = await lane.submit([2])
        return results, c

    results, c = asyncio.run(main())
    assert calls == [[13, 1], [2]]
    assert all(isinstance(r, ValueError) and "13" in str(r) for r in results)
    assert c == [2]


def test_wrong_output_count_is_an_error_not_a_silent_misalignment():
    async def main():
        lane = BatchLane(lambda items: items[:-1], max_items=8)
        return await lane.submit([1, 2])

    with pytest.raises(RuntimeError, match="1 outputs for 2 items"):
        asyncio.run(main())


def test_cancelled_requests_are_dropped_before_they_run():
    model = SlowModel(call_s=0.05)

    async def main():
        lane = BatchLane(model, max_items=8)
        busy = await submit_and_start(lane, [1])
        gone, kept = lane.submit([2]), lane.submit([3])
        gone.cancel()  # the client disconnected while waiting
        return await busy, await kept

    assert asyncio.run(main()) == ([2], [6])
    assert model.calls == [[1], [3]]


def test_max_items_must_be_positive():
    with pytest.raises(ValueError, match="max_items"):
        BatchLane(lambda items: items, max_items=0)
