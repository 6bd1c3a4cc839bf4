"""Prompt assembly and citation postprocessing for a retrieval copilot.

:func:`assemble_prompt` puts the retrieved chunks into a template, numbered as citations ``[1]``, ``[2]`` ... in
rank order, within the generation model's context: the prompt gets ``context_window_tokens - max_output_tokens``
tokens, counted with the caller's tokenizer (``count_tokens(text) -> int``, the serving model's own, so the
budget is the model's and not an estimate). When the chunks do not all fit, the lowest-ranked are dropped first
(a lower-ranked chunk never displaces a higher-ranked one); no chunk is cut mid-text unless the best one alone
exceeds the budget, in which case it is cut at a word boundary.

:func:`resolve_citations` maps the ``[n]`` markers of the model's answer back to the chunks' sources (doc_id,
source, passage) and drops markers that point to no chunk, so a client never shows a citation to nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import Field, model_validator

from aifactory.config import StrictModel
from aifactory.retrieval.index import Chunk

TokenCounter = Callable[[str], int]

DEFAULT_TEMPLATE = (
    "Answer the question using only the numbered sources below. Cite the sources you use by their number in "
    "brackets, like [1]. If the sources do not contain the answer, say that you do not know.\n\n"
    "Sources:\n{context}\n\nQuestion: {question}\nAnswer:"
)
DEFAULT_CHUNK_TEMPLATE = "[{n}] ({source}) {text}"
NO_SOURCES = "(no sources)"
_CHUNK_FIELDS = ("{n}", "{doc_id}", "{passage}", "{source}", "{text}")


class PromptConfig(StrictModel):
    """How retrieved chunks become the generation model's prompt."""

    template: str = Field(
        DEFAULT_TEMPLATE, description="The prompt; '{context}' is replaced by the numbered chunks and '{question}' "
        "by the user's question (each exactly once; other braces are left as they are).")
    chunk_template: str = Field(
        DEFAULT_CHUNK_TEMPLATE, description="One chunk in the context: '{n}' (its citation number) and '{text}' "
        "required; '{doc_id}', '{passage}' and '{source}' optional.")
    context_window_tokens: int = Field(2048, ge=16, description="The generation model's context window, in tokens.")
    max_output_tokens: int = Field(256, ge=1, description="Tokens reserved for the answer; the prompt gets the rest.")
    max_question_chars: int = Field(4000, ge=1, description="Longest question accepted, in characters.")

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        for name in ("{context}", "{question}"):
            if self.template.count(name) != 1:
                problems.append(f"template: must contain {name} exactly once (found {self.template.count(name)})")
        for name in ("{n}", "{text}"):
            if name not in self.chunk_template:
                problems.append(f"chunk_template: must contain {name}")
        if self.max_output_tokens >= self.context_window_tokens:
            problems.append(f"max_output_tokens: {self.max_output_tokens} leaves no room for a prompt in "
                            f"context_window_tokens={self.context_window_tokens}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def prompt_budget_tokens(self) -> int:
        return self.context_window_tokens - self.max_output_tokens


@dataclass(frozen=True)
class Citation:
    """What ``[n]`` in a prompt or an answer refers to."""

    n: int
    doc_id: str
    passage: int
    source: str

    @property
    def ref(self) -> str:
        return f"{self.doc_id}#{self.passage}"


@dataclass(frozen=True)
class Prompt:
    text: str
    citations: tuple[Citation, ...]  # [1], [2] ... in the prompt, best-ranked first
    dropped: tuple[str, ...]  # refs of the retrieved chunks left out for the budget, in rank order
    truncated: bool  # the best chunk alone exceeded the budget and was cut at a word boundary
    prompt_tokens: int
    budget_tokens: int


def check_question(question, *, max_chars: int) -> str:
    """The question, or a ValueError naming the field (non-text, empty, longer than ``max_chars``)."""
    if not isinstance(question, str):
        raise ValueError(f"question: expected text (got {type(question).__name__})")  # noqa: TRY004 (a 400)
    if not question.strip():
        raise ValueError("question: empty; ask something")
    if len(question) > max_chars:
        raise ValueError(f"question: {len(question)} characters, over max_question_chars={max_chars}")
    return question


def _render(config: PromptConfig, question: str, chunks: Sequence[Chunk], first_text: str | None = None) -> str:
    lines = []
    for n, c in enumerate(chunks, 1):
        text = first_text if n == 1 and first_text is not None else c.text
        line = config.chunk_template
        for name, value in (("{n}", n), ("{doc_id}", c.doc_id), ("{passage}", c.passage), ("{source}", c.source)):
            line = line.replace(name, str(value))
        lines.append(line.replace("{text}", text))  # last, so braces in the text stay text
    context = "\n\n".join(lines) if lines else NO_SOURCES
    head, tail = config.template.split("{context}")
    # substitute in each part separately, so a "{question}" inside a chunk is never replaced
    return head.replace("{question}", question) + context + tail.replace("{question}", question)


def assemble_prompt(question: str, chunks: Sequence, *, config: PromptConfig, count_tokens: TokenCounter) -> Prompt:
    """The prompt for ``question`` over ``chunks`` (:class:`~aifactory.retrieval.index.Chunk` or tier hits, best
    first), within ``config``'s token budget as ``count_tokens`` counts it."""
    question = check_question(question, max_chars=config.max_question_chars)
    ranked = [getattr(c, "chunk", c) for c in chunks]
    budget = config.prompt_budget_tokens

    def fits(text: str) -> tuple[bool, int]:
        n = int(count_tokens(text))
        return n <= budget, n

    ok, bare_tokens = fits(_render(config, question, []))
    if not ok:
        raise ValueError(f"question: the prompt without sources is {bare_tokens} tokens, over the prompt budget of "
                         f"{budget} (context_window_tokens - max_output_tokens); ask a shorter question")
    for m in range(len(ranked), 0, -1):  # drop the lowest-ranked first
        text = _render(config, question, ranked[:m])
        ok, tokens = fits(text)
        if ok:
            return Prompt(text, _citations(ranked[:m]), tuple(c.ref for c in ranked[m:]), False, tokens, budget)
    if ranked:  # the best chunk alone is over the budget: the longest word prefix of it that fits
        words = ranked[0].text.split()
        lo, hi = 0, len(words) - 1  # invariant: a prefix of lo words fits (0 words: checked above, nearly)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(_render(config, question, ranked[:1], " ".join(words[:mid]) + " ..."))[0]:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            text = _render(config, question, ranked[:1], " ".join(words[:lo]) + " ...")
            return Prompt(text, _citations(ranked[:1]), tuple(c.ref for c in ranked[1:]), True, fits(text)[1],
                          budget)
    text = _render(config, question, [])
    return Prompt(text, (), tuple(c.ref for c in ranked), False, bare_tokens, budget)


def _citations(chunks: Sequence[Chunk]) -> tuple[Citation, ...]:
    return tuple(Citation(n, c.doc_id, c.passage, c.source) for n, c in enumerate(chunks, 1))


@dataclass(frozen=True)
class ResolvedAnswer:
    text: str  # the answer with markers to nothing removed
    sources: tuple[Citation, ...]  # the cited chunks, in order of first citation
    unresolved: tuple[int, ...]  # marker numbers that pointed to no chunk (dropped from the text)


_MARKER = re.compile(r"(\s?)\[(\s*\d+\s*(?:,\s*\d+\s*)*)\]")


def resolve_citations(answer: str, citations: Sequence[Citation]) -> ResolvedAnswer:
    """Resolve ``[n]`` and ``[n, m]`` markers of ``answer`` to ``citations``; markers that point to none are
    dropped (a group keeps its valid numbers)."""
    if not isinstance(answer, str):
        raise ValueError(f"answer: expected text (got {type(answer).__name__})")  # noqa: TRY004 (a 400)
    by_n = {c.n: c for c in citations}
    cited: dict[int, Citation] = {}
    unresolved: list[int] = []

    def one(m: re.Match) -> str:
        numbers = [int(x) for x in m.group(2).split(",")]
        kept = [n for n in numbers if n in by_n]
        unresolved.extend(n for n in numbers if n not in by_n)
        for n in kept:
            cited.setdefault(n, by_n[n])
        return f"{m.group(1)}[{', '.join(map(str, kept))}]" if kept else ""

    text = _MARKER.sub(one, answer)
    return ResolvedAnswer(text, tuple(cited.values()), tuple(dict.fromkeys(unresolved)))
