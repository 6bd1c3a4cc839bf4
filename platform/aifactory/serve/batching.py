"""One model call at a time, each taking every request that waited for it: the gate behind ``@serve.batch``.

Why this exists: Ray 2.60's ``@serve.batch`` forms the next batch as soon as ``batch_wait_timeout_s`` has
passed, whether or not the model is still busy with the previous one (ray-project/ray#53096 made batch
execution concurrent, gated by ``max_concurrent_batches``; with the default of 1 the formed batches wait in
line). Under steady load each batch then holds only the requests of one window: measured on 2 cores with
MiniLM at 112 req/s open-loop, 2 requests per model call while 70 waited, p50 565 ms, the replica answering
~90 req/s where the same replica answered 180 req/s to 32 closed-loop clients (whose requests arrive
together and so fill batches).

:class:`BatchLane` restores the batching a model server wants: the ``@serve.batch`` function hands its
requests to the lane and returns at once (so batches never queue at Serve's gate), and the lane runs the
model on one worker thread; each call takes every request that arrived while the previous call ran, up to
``max_items``. An idle lane starts at once, so at low load a request waits only ``@serve.batch``'s window.

A call holds different tenants' requests, so one request whose items make the model raise (text the
tokenizer cannot encode, say) must not fail the others: :func:`isolate_failures` runs the model so that each
failing item gets its exception in its place, and the lane fails only the request holding it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class LaneStats:
    calls: int = 0  # model calls run
    items: int = 0  # items (e.g. texts) those calls held
    largest: int = 0  # items in the largest call


class BatchLane:
    """Runs ``fn(items) -> outputs`` (one output per item, in order) on a worker thread, one call at a time.

    ``submit(items)`` queues one request's items and returns a future of that request's outputs. While a
    call runs, submissions wait; the next call merges them in arrival order up to ``max_items`` items (a
    request is never split; one larger than ``max_items`` runs alone). An exception from ``fn`` is set on
    the future of every request in that call; an exception that ``fn`` returns as an item's output is set on
    the future of that item's request only. Cancelled futures (the client left) are dropped unrun.
    Every method must be called from the event loop that owns the lane.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_items: int,
                 on_call: Callable[[int], None] | None = None):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.fn = fn
        self.max_items = max_items
        self.on_call = on_call  # told each call's item count (e.g. a metrics histogram)
        self.stats = LaneStats()
        self._waiting: deque[tuple[list[Any], asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None

    def submit(self, items: list[Any]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((list(items), fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return fut

    def _next_call(self) -> list[tuple[list[Any], asyncio.Future]]:
        call: list[tuple[list[Any], asyncio.Future]] = []
        n = 0
        while self._waiting:
            items, fut = self._waiting[0]
            if fut.cancelled():
                self._waiting.popleft()
                continue
            if call and n + len(items) > self.max_items:
                break
            call.append(self._waiting.popleft())
            n += len(items)
        return call

    async def _drain(self) -> None:
        while call := self._next_call():
            flat = [x for items, _ in call for x in items]
            self.stats.calls += 1
            self.stats.items += len(flat)
            self.stats.largest = max(self.stats.largest, len(flat))
            if self.on_call is not None:
                self.on_call(len(flat))
            try:
                outputs = await asyncio.to_thread(self.fn, flat)
                if len(outputs) != len(flat):
                    raise RuntimeError(f"batch function returned {len(outputs)} outputs for {len(flat)} items")
            except Exception as err:  # every request of the call sees the model's error
                for _, fut in call:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            i = 0
            for items, fut in call:
                mine = outputs[i:i + len(items)]
                i += len(items)
                if fut.done():
                    continue
                failed = next((o for o in mine if isinstance(o, BaseException)), None)
                if failed is not None:
                    fut.set_exception(failed)
                else:
                    fut.set_result(mine)


def isolate_failures(fn: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> list[Any]:
    """``fn(items)``, except that where it raises, each item that fails on its own gets its exception in place
    of its output and the others get theirs (a :class:`BatchLane` then fails only the requests holding the
    failed items).

    A failed call is split in halves and each half run again, down to single items: k failing items among n
    cost O(k log n) more calls, and a call with none costs nothing extra."""
    try:
        outputs = list(fn(items))
    except Exception as err:
        if len(items) <= 1:
            return [err] * len(items)
        mid = len(items) // 2
        return isolate_failures(fn, items[:mid]) + isolate_failures(fn, items[mid:])
    if len(outputs) != len(items):
        raise RuntimeError(f"batch function returned {len(outputs)} outputs for {len(items)} items")
    return outputs
