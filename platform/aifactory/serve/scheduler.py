"""The iteration-level scheduling policy of the continuous-batching engine: pure Python, no torch.

Every step the engine asks :meth:`Scheduler.schedule` which sequences run and how many of their tokens; the
answer respects three budgets (``aifactory.serve.config.ContinuousBatchingConfig``):

- **rows**: at most ``max_num_seqs`` sequences hold KV state at once (the running batch);
- **tokens per step**: every running decode costs 1 token and goes first, so decodes never stall; what is
  left prefills prompts in chunks (a long prompt takes several steps while the decodes keep going);
- **KV blocks**: a sequence owns ``ceil(computed tokens / block_tokens)`` blocks of the shared pool.

A sequence's tokens are its prompt plus what it generated; ``num_computed`` of them have KV state. Prefill
and decode are the same thing here: compute the tokens not yet computed (a decode is one such token), and
when a sequence's last token is computed it samples the next. So **preemption by recompute** is simply:
free the victim's blocks, set ``num_computed = 0`` and put it back in the waiting queue; when it is admitted
again it prefills prompt + generated tokens (in chunks) and continues where it stopped.

Priority: a sequence's rank is ``(priority, arrival)`` (priority 0 = interactive, 1 = batch; lower is
served first). Waiting sequences are admitted in rank order; when a running sequence needs a block and none
is free, the worst-ranked (lowest-priority, newest) running sequence is preempted, possibly itself. With
``priority_preemption``, a waiting sequence of a better class may also preempt a running sequence of a worse
class to get a row or blocks, so a flood of batch traffic cannot hold the batch against interactive requests.
(nano-vllm's scheduler, prefill-first with preempt-by-recompute, was the reference for the policy; this one
mixes decodes and chunked prefills in one step, as vLLM's chunked-prefill scheduler does.)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

INTERACTIVE, BATCH = 0, 1
PRIORITY = {"interactive": INTERACTIVE, "batch": BATCH}


@dataclass(eq=False)
class Seq:
    """One request's sequence as the scheduler sees it."""

    id: int
    tokens: list[int]  # prompt + generated
    prompt_len: int
    priority: int = INTERACTIVE
    arrival: int = 0  # admission order: smaller arrived earlier
    num_computed: int = 0  # tokens whose KV state is in the cache
    blocks: list[int] = field(default_factory=list)
    preemptions: int = 0

    @property
    def rank(self) -> tuple[int, int]:
        return (self.priority, self.arrival)

    @property
    def pending(self) -> int:
        """Tokens still to compute before this sequence can sample (1 while it decodes)."""
        return len(self.tokens) - self.num_computed


@dataclass
class Plan:
    """One step: ``(seq, num_tokens)`` in the order the engine packs them, and who was preempted for it."""

    work: list[tuple[Seq, int]]
    preempted: list[Seq]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    """Admission, chunking and preemption over a pool of ``num_blocks`` KV blocks of ``block_tokens`` positions."""

    def __init__(self, *, max_num_seqs: int, max_tokens_per_step: int, num_blocks: int, block_tokens: int,
                 priority_preemption: bool = True):
        if max_tokens_per_step < max_num_seqs:
            raise ValueError(f"max_tokens_per_step ({max_tokens_per_step}) must be >= max_num_seqs ({max_num_seqs}): "
                             "every running sequence decodes one token per step")
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks
        self.priority_preemption = priority_preemption
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.waiting: list[Seq] = []  # kept sorted by rank
        self.running: list[Seq] = []
        self.num_preemptions = 0

    # ---- the queues --------------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.rank)

    def remove(self, seq: Seq) -> None:
        """A sequence leaves (finished, failed or cancelled): its blocks go back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free)

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Choose this step's work: decodes of running sequences, then their unfinished prefills, then new
        admissions, each in rank order, within the token and block budgets."""
        budget = self.max_tokens_per_step
        work: dict[int, tuple[Seq, int]] = {}  # seq.id -> (seq, tokens), in insertion order
        preempted: list[Seq] = []

        def preempt(victim: Seq) -> None:
            nonlocal budget
            if victim.id in work:
                budget += work.pop(victim.id)[1]
            self.running.remove(victim)
            self._release(victim)
            victim.num_computed = 0
            victim.preemptions += 1
            self.num_preemptions += 1
            preempted.append(victim)
            self.add(victim)

        decoding = sorted((s for s in self.running if s.pending == 1), key=lambda s: s.rank)
        prefilling = sorted((s for s in self.running if s.pending > 1), key=lambda s: s.rank)
        for seq in decoding + prefilling:
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.pending, budget)
            while self._blocks_short(seq, n) and seq in self.running:
                victim = max(self.running, key=lambda s: s.rank)
                if victim is seq and n > 1:
                    # A prefill chunk shrinks to the blocks there are before anyone is preempted for it.
                    n = min(n, len(seq.blocks) * self.block_tokens + len(self.free) * self.block_tokens
                            - seq.num_computed)
                    if n <= 0:
                        n = 0
                        break
                    continue
                preempt(victim)
            if seq in self.running and n > 0:
                self._grow(seq, n)
                work[seq.id] = (seq, n)
                budget -= n

        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq in preempted:
                break  # preempted for this very step: readmitting it now would only churn
            n = min(seq.pending, budget)
            need = self._blocks_for(seq.num_computed + n) - len(seq.blocks)
            victims = self._victims_for(seq, rows=len(self.running) >= self.max_num_seqs, blocks=need)
            if victims is None:
                break  # admission keeps rank order: nobody jumps the head of the queue
            for v in victims:
                preempt(v)
            self.waiting.remove(seq)
            self.running.append(seq)
            self._grow(seq, n)
            work[seq.id] = (seq, n)
            budget -= n
        return Plan(list(work.values()), preempted)

    def commit(self, plan: Plan) -> None:
        """The step ran: its tokens now have KV state."""
        for seq, n in plan.work:
            seq.num_computed += n

    # ---- blocks ------------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def _blocks_short(self, seq: Seq, n: int) -> bool:
        return self._blocks_for(seq.num_computed + n) - len(seq.blocks) > len(self.free)

    def _grow(self, seq: Seq, n: int) -> None:
        for _ in range(self._blocks_for(seq.num_computed + n) - len(seq.blocks)):
            seq.blocks.append(self.free.pop())

    def _release(self, seq: Seq) -> None:
        self.free.extend(reversed(seq.blocks))
        seq.blocks = []

    def _victims_for(self, seq: Seq, *, rows: bool, blocks: int) -> list[Seq] | None:
        """Running sequences to preempt so that ``seq`` gets a row (if ``rows``) and ``blocks`` blocks; ``[]``
        if it fits now, None if it cannot be admitted this step. Only sequences of a worse class than ``seq``
        are preempted for an admission (never its own class, which would only trade places)."""
        if not rows and blocks <= len(self.free):
            return []
        if not self.priority_preemption:
            return None
        victims: list[Seq] = []
        freed = 0
        for v in sorted(self.running, key=lambda s: s.rank, reverse=True):
            if v.priority <= seq.priority:
                break
            victims.append(v)
            freed += len(v.blocks)
            if blocks <= len(self.free) + freed:
                return victims
        return None
