"""One continuous-batching engine loop per replica, shared by every request the replica holds.

Why: :class:`~aifactory.serve.engine_cb.ContinuousEngine` is synchronous and single-threaded, while a Serve
replica answers many requests at once on its event loop. :class:`EngineLoop` runs the engine in one worker
thread (torch's inference mode is per thread) that steps while any request is queued or running and sleeps
otherwise; callers on the event loop submit a request and iterate its deltas (:meth:`EngineLoop.stream`).
So a request that arrives while others decode joins the running batch at the next step, and one that ends
leaves it at once, streamed or not.

Hand-offs between the two sides go through a lock-free inbox (adds, cancels, model swaps), drained by the
worker before each step, and ``loop.call_soon_threadsafe`` for the deltas back. A caller that goes away
(client disconnect, cancelled task) cancels its request, which frees its KV blocks at the next step.

A model swap builds a new engine for new requests; the old one keeps stepping until its requests end, so an
answer never mixes two versions. A failure of the engine itself (not of one request: the engine isolates
those) ends every request it held with that error; the loop goes on with the next requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aifactory.serve.engine import GenDelta, GenItem, LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["EngineLoop", "StepSample"]


@dataclass
class StepSample:
    """What one engine step did, for the metrics (see :class:`aifactory.serve.metrics.EngineMetrics`)."""

    tokens: int  # tokens run through the model in the step
    running: int
    waiting: int
    kv_blocks_in_use: int
    kv_blocks: int
    preemptions: int  # preemptions of this step


@dataclass(eq=False)
class _Ticket:
    item: GenItem
    on_delta: Callable[[GenDelta], None]
    engine: object = None  # the ContinuousEngine it went to
    rid: int | None = None


def _hand_over(loop: asyncio.AbstractEventLoop, deltas: asyncio.Queue, delta: GenDelta) -> None:
    try:
        loop.call_soon_threadsafe(deltas.put_nowait, delta)
    except RuntimeError:  # the replica's event loop is closed (shutting down): nobody waits for this delta
        pass


class EngineLoop:
    """A :class:`ContinuousEngine` driven by a worker thread; ``on_step`` (if given) runs in that thread."""

    def __init__(self, loaded: LoadedModel, *, config, prefix_cache=None,
                 on_step: Callable[[StepSample], None] | None = None):
        self.config = config
        self.prefix_cache = prefix_cache
        self.on_step = on_step
        self._engines = [self._engine(loaded)]
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def _engine(self, loaded: LoadedModel):
        from aifactory.serve.engine_cb import ContinuousEngine

        return ContinuousEngine(loaded, config=self.config, prefix_cache=self.prefix_cache)

    @property
    def engine(self):
        """The engine new requests go to (its ``loaded`` is the version they get)."""
        return self._engines[-1]

    # ---- the event loop's side ---------------------------------------------------------------------
    def _post(self, *op) -> None:
        self._inbox.append(op)
        self._wake.set()

    def swap(self, loaded: LoadedModel) -> None:
        """Serve ``loaded`` to requests submitted from now on; running ones finish on their version."""
        self._post("swap", self._engine(loaded))

    async def stream(self, item: GenItem) -> AsyncIterator[GenDelta]:
        """The request's deltas as the engine decodes them; the last one carries the result."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[GenDelta] = asyncio.Queue()
        ticket = _Ticket(item, lambda d: _hand_over(loop, deltas, d))
        self._post("add", ticket)
        done = False
        try:
            while not done:
                delta = await deltas.get()
                done = delta.result is not None
                yield delta
        finally:
            if not done:
                self._post("cancel", ticket)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # ---- the worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._closed:
                self._wake.clear()  # before draining: a post after the drain sets it again, so no wake is lost
                self._drain()
                busy = [e for e in self._engines if e.has_work]
                if not busy:
                    del self._engines[:-1]  # retired engines of earlier versions, now idle
                    self._wake.wait()
                    continue
                for eng in busy:
                    self._step(eng)

    def _drain(self) -> None:
        while self._inbox:
            op, arg = self._inbox.popleft()
            if op == "add":
                arg.engine = self.engine
                arg.rid = arg.engine.add(arg.item, on_delta=arg.on_delta)
            elif op == "cancel" and arg.rid is not None:
                arg.engine.cancel(arg.rid)
            elif op == "swap":
                self._engines.append(arg)

    def _step(self, eng) -> None:
        before = eng.stats.preemptions, eng.stats.tokens_computed
        try:
            eng.step()
        except Exception as err:  # the engine broke: its requests fail, the next ones are served
            logger.exception("the engine step failed; failing the %d requests it held", eng.num_running
                             + eng.num_waiting)
            eng.fail_all(err)
            return
        if self.on_step is not None:
            self.on_step(StepSample(
                tokens=eng.stats.tokens_computed - before[1], running=eng.num_running, waiting=eng.num_waiting,
                kv_blocks_in_use=eng.blocks_in_use, kv_blocks=eng.cache.num_blocks,
                preemptions=eng.stats.preemptions - before[0]))
