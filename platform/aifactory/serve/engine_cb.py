"""The continuous-batching (iteration-level) generation engine: requests join and leave the batch every step.

Why: the static engine (:mod:`aifactory.serve.engine`) decodes a batch to its end, and only rows of equal
prompt length together; on real traffic (varied prompts, varied outputs) most rows idle while the longest one
finishes and a request that arrives meanwhile waits for the whole batch. Here every :meth:`ContinuousEngine.step`

1. asks the :class:`~aifactory.serve.scheduler.Scheduler` for this step's work (decodes first, then prefill
   chunks, then admissions in SLO-class order, preempting by recompute when the KV blocks run out);
2. runs one model call over all of it (:func:`aifactory.models.paged.ragged_forward`: each sequence at its
   own position, over a block-paged KV cache);
3. samples the next token of every sequence whose tokens are all computed, with the request's own
   temperature and seeded generator (so a seeded answer does not depend on what it was batched with), and
   hands each request its delta; finished sequences leave and free their blocks at once.

Prefix cache (optional, the app's :class:`~aifactory.serve.cache.PrefixCache`, scoped per tenant): a request
whose prompt starts with a cached prefix of *its own tenant* gets that prefix's KV state copied into its first
blocks when it is admitted and prefills only the rest; once a prompt is computed its block-aligned prefixes are
stored. The state is in the static engine's layout (``(1, heads, tokens, head_dim)`` per layer), so both engines
share one cache. A preempted request recomputes from scratch.

Sampling and stopping are the static engine's (:func:`aifactory.serve.engine._sample`, EOS, ``max_tokens``,
the model's ``seq_len``), so a greedy answer is token-identical to the same request decoded alone
(``tests/unit/test_serve_engine_cb.py``). Isolation as in the static engine: what raises for one request
(its seed, its tokens, its sampling) ends that request alone with ``error`` set; only a failure of the
shared model call fails the requests of that step.

The engine is synchronous and single-threaded: the caller (a benchmark, a Serve replica's worker thread)
calls :meth:`~ContinuousEngine.add` and :meth:`~ContinuousEngine.step`; ``on_delta`` callbacks run inside
``step``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aifactory.data.tokenizer import EOS
from aifactory.serve.cache import PrefixCache
from aifactory.serve.config import ContinuousBatchingConfig
from aifactory.serve.engine import GenDelta, GenItem, GenResult, LoadedModel, _sample
from aifactory.serve.scheduler import PRIORITY, Scheduler, Seq

__all__ = ["ContinuousEngine", "EngineStats"]


@dataclass
class EngineStats:
    steps: int = 0
    tokens_computed: int = 0  # prompt and generated tokens run through the model (recomputes included)
    tokens_generated: int = 0
    preemptions: int = 0
    largest_batch: int = 0  # most sequences in one step


@dataclass(eq=False)
class _Request:
    item: GenItem
    seq: Seq
    generator: object = None
    generated: list[int] = field(default_factory=list)
    arrived_s: float = 0.0
    scheduled_s: float | None = None  # first time it was in a step
    first_token_s: float | None = None
    rows_seen: int = 0
    prefix_hit: int = 0  # prompt tokens found in the prefix cache at arrival
    prefix_state: object = None  # their KV state, until copied into the sequence's blocks
    prefix_stored: bool = False


class ContinuousEngine:
    """Generates for requests that arrive at any time, with one :class:`LoadedModel` and one KV pool."""

    def __init__(self, loaded: LoadedModel, *, config: ContinuousBatchingConfig | None = None,
                 prefix_cache: PrefixCache | None = None):
        from aifactory.models.paged import PagedKVCache

        self.loaded = loaded
        self.prefix_cache = prefix_cache
        self.config = cfg = config or ContinuousBatchingConfig()
        self.seq_len = loaded.seq_len
        per_seq = -(-self.seq_len // cfg.kv_block_tokens)
        num_blocks = cfg.kv_blocks or cfg.max_num_seqs * per_seq
        if num_blocks < per_seq:
            from aifactory.exceptions import ConfigError

            raise ConfigError("continuous batching config", [
                (f"kv_blocks ({num_blocks}) x kv_block_tokens ({cfg.kv_block_tokens}) holds fewer positions than "
                 f"the model's seq_len ({self.seq_len}); one full-length sequence must fit: raise kv_blocks to at "
                 f"least {per_seq}, or leave it null")])
        self.vocab_size = loaded.model.config.vocab_size
        self.cache = PagedKVCache.for_model(loaded.model, num_blocks=num_blocks, block_tokens=cfg.kv_block_tokens)
        self.scheduler = Scheduler(max_num_seqs=cfg.max_num_seqs, max_tokens_per_step=cfg.max_tokens_per_step,
                                   num_blocks=num_blocks, block_tokens=cfg.kv_block_tokens,
                                   priority_preemption=cfg.priority_preemption)
        self.stats = EngineStats()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._early: dict[int, GenDelta] = {}  # requests that failed on arrival: answered by the next step
        self._callbacks: dict[int, Callable[[GenDelta], None]] = {}

    # ---- requests ----------------------------------------------------------------------------------
    def add(self, item: GenItem, *, on_delta: Callable[[GenDelta], None] | None = None) -> int:
        """Queue a request; returns its id. Its deltas come from :meth:`step` (and ``on_delta``)."""
        import torch

        rid = next(self._ids)
        seq = Seq(rid, list(item.tokens), len(item.tokens), priority=PRIORITY.get(item.slo_class, 1),
                  arrival=next(self._arrivals))
        req = _Request(item, seq, arrived_s=time.monotonic())
        self._requests[rid] = req
        if on_delta is not None:
            self._callbacks[rid] = on_delta
        try:
            self._check(item)
            req.generator = torch.Generator().manual_seed(item.seed) if item.seed is not None else None
        except Exception as err:  # noqa: BLE001 - this request's own input fails it alone
            self._early[rid] = self._finish(req, "error", err)
            return rid
        if self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(self.loaded.version, item.tokens, tenant=item.tenant)
            if hit is not None:
                req.prefix_hit, req.prefix_state = hit
                seq.num_computed = req.prefix_hit  # its blocks are filled from the state when it is admitted
        self.scheduler.add(seq)
        return rid

    def _check(self, item: GenItem) -> None:
        if not item.tokens:
            raise ValueError("the prompt has no tokens")
        if len(item.tokens) > self.seq_len:
            raise ValueError(f"the prompt's {len(item.tokens)} tokens exceed the model's seq_len ({self.seq_len})")
        bad = next((t for t in item.tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise IndexError(f"token id {bad} is out of range (vocabulary of {self.vocab_size})")

    def cancel(self, rid: int) -> None:
        """Drop a request (its client went away): it leaves the batch and frees its blocks; no more deltas."""
        req = self._requests.pop(rid, None)
        self._early.pop(rid, None)
        self._callbacks.pop(rid, None)
        if req is not None:
            self.scheduler.remove(req.seq)

    def fail_all(self, err: BaseException) -> None:
        """End every request with ``err`` (the engine itself broke, not one request): each caller hears it."""
        out = {rid: self._finish(req, "error", err) for rid, req in list(self._requests.items())}
        out.update(self._early)
        self._early = {}
        self._deliver(out)

    @property
    def blocks_in_use(self) -> int:
        return self.scheduler.blocks_in_use

    @property
    def has_work(self) -> bool:
        return bool(self._early) or self.scheduler.has_work

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one iteration -----------------------------------------------------------------------------
    def step(self) -> dict[int, GenDelta]:
        """Run one iteration; returns the delta of every request that got one (a new token, or its end)."""
        from aifactory.models.paged import RaggedBatch, ragged_forward

        out, self._early = self._early, {}
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        if plan.work:
            work = plan.work
            samplers = [i for i, (seq, n) in enumerate(work) if seq.num_computed + n == len(seq.tokens)]
            model = self.loaded.model
            try:
                self._load_prefixes(work)
                batch = RaggedBatch.build(
                    [(seq.tokens[seq.num_computed:seq.num_computed + n], seq.num_computed, seq.blocks)
                     for seq, n in work],
                    block_tokens=self.cache.block_tokens, logits_at=samplers, device=self.cache.keys[0].device)
                logits = ragged_forward(model, batch, self.cache).float().cpu()
            except Exception as err:  # noqa: BLE001 - the shared call failed: every request of this step fails
                for seq, _ in work:
                    out[seq.id] = self._finish(self._requests[seq.id], "error", err)
                return self._deliver(out)
            self.scheduler.commit(plan)
            self._store_prefixes(work)
            self.stats.steps += 1
            self.stats.tokens_computed += plan.num_tokens
            self.stats.largest_batch = max(self.stats.largest_batch, len(work))
            now = time.monotonic()
            for seq, _ in work:
                req = self._requests[seq.id]
                req.rows_seen = max(req.rows_seen, len(work))
                if req.scheduled_s is None:
                    req.scheduled_s = now
            for row, i in enumerate(samplers):
                seq = work[i][0]
                delta = self._sample(self._requests[seq.id], logits[row])
                if delta is not None:
                    out[seq.id] = delta
        return self._deliver(out)

    def _sample(self, req: _Request, logits) -> GenDelta | None:
        item = req.item
        try:
            tok = _sample(logits, item.temperature, req.generator)
        except Exception as err:  # noqa: BLE001 - this row's sampling fails this request alone
            return self._finish(req, "error", err)
        if req.first_token_s is None:
            req.first_token_s = time.monotonic()
        if tok == EOS:
            return self._finish(req, "stop")
        req.generated.append(tok)
        req.seq.tokens.append(tok)
        self.stats.tokens_generated += 1
        # The last token a sequence can emit is sampled from the logits of position seq_len - 1; it is never fed.
        if len(req.generated) >= item.max_tokens or len(req.seq.tokens) > self.seq_len:
            return self._finish(req, "length", new=[tok])
        return GenDelta([tok])

    def _finish(self, req: _Request, reason: str, err: Exception | None = None, *,
                new: list[int] | None = None) -> GenDelta:
        self.scheduler.remove(req.seq)
        self._requests.pop(req.seq.id, None)
        now = time.monotonic()

        def since(t):
            return None if t is None else t - req.arrived_s

        timings = {"queue_s": since(req.scheduled_s), "ttft_s": since(req.first_token_s),
                   "total_s": now - req.arrived_s, "preemptions": req.seq.preemptions, "batch_rows": req.rows_seen}
        error = None if err is None else f"{type(err).__name__}: {err}"
        result = GenResult(list(req.generated), reason, prefix_hit_tokens=req.prefix_hit, version=self.loaded.version, timings=timings, error=error)
        return GenDelta(list(new or []), result=result)

    # ---- the prefix cache ----------------------------------------------------------------------------
    def _slots(self, seq: Seq, n: int):
        import torch

        bt = self.cache.block_tokens
        return torch.tensor([seq.blocks[p // bt] * bt + p % bt for p in range(n)], dtype=torch.long,
                            device=self.cache.keys[0].device)

    def _load_prefixes(self, work: list[tuple[Seq, int]]) -> None:
        """Copy the cached prefix state of newly admitted sequences into their blocks."""
        for seq, _ in work:
            req = self._requests[seq.id]
            if req.prefix_state is None:
                continue
            state, req.prefix_state = req.prefix_state, None
            if seq.num_computed != req.prefix_hit:
                continue  # preempted before it ran: it recomputes from the start
            slots = self._slots(seq, req.prefix_hit)
            for layer, (k, v) in enumerate(state):
                h, d = k.shape[1], k.shape[3]
                self.cache.keys[layer].view(-1, h, d).index_copy_(0, slots, k[0].transpose(0, 1).to(
                    self.cache.keys[layer].dtype))
                self.cache.values[layer].view(-1, h, d).index_copy_(0, slots, v[0].transpose(0, 1).to(
                    self.cache.values[layer].dtype))

    def _store_prefixes(self, work: list[tuple[Seq, int]]) -> None:
        """Store the block-aligned prefixes of prompts computed in full by this step (under their tenant)."""
        if self.prefix_cache is None:
            return
        version = self.loaded.version
        for seq, _ in work:
            req = self._requests[seq.id]
            if req.prefix_stored or seq.num_computed < seq.prompt_len:
                continue
            req.prefix_stored = True
            prompt, tenant = req.item.tokens, req.item.tenant
            for m in self.prefix_cache.candidate_lengths(len(prompt)):
                if m <= req.prefix_hit or (tenant, version, prompt[:m]) in self.prefix_cache:
                    continue
                slots = self._slots(seq, m)
                state = [(k.view(-1, *k.shape[2:]).index_select(0, slots).transpose(0, 1)[None].clone(),
                          v.view(-1, *v.shape[2:]).index_select(0, slots).transpose(0, 1)[None].clone())
                         for k, v in zip(self.cache.keys, self.cache.values)]
                self.prefix_cache.put(version, prompt[:m], state, tenant=tenant)

    def _deliver(self, out: dict[int, GenDelta]) -> dict[int, GenDelta]:
        for rid, delta in out.items():
            cb = self._callbacks.pop(rid, None) if delta.result is not None else self._callbacks.get(rid)
            if cb is not None:
                cb(delta)
        return out

    # ---- offline use -------------------------------------------------------------------------------
    def generate(self, items: Sequence[GenItem]) -> list[GenResult]:
        """Every item's result, in order (all queued at once, then stepped until each is done)."""
        ids = [self.add(it) for it in items]
        results: dict[int, GenResult] = {}
        while len(results) < len(ids):
            for rid, d in self.step().items():
                if d.result is not None:
                    results[rid] = d.result
        return [results[i] for i in ids]
