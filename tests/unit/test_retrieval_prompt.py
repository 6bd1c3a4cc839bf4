"""Prompt assembly within the model's token budget (lowest-ranked chunks dropped first, a chunk cut only when the
best one alone is too long) and citation markers resolved to sources (no Ray)."""

from __future__ import annotations

import pytest
from aifactory.config import parse_config
from aifactory.exceptions import ConfigError
from aifactory.retrieval.index import Chunk
from aifactory.retrieval.prompt import (
    Citation,
    PromptConfig,
    assemble_prompt,
    resolve_citations,
)


def words(text: str) -> int:  # a tokenizer: one token per whitespace-separated word
    return len(text.split())


def chunk(doc: str, n_words: int, passage: int = 0) -> Chunk:
    return Chunk(doc_id=doc, passage=passage, text=" ".join(f"{doc}-w{i}" for i in range(n_words)),
                 source=f"/corpus/{doc}")


CONFIG = {"template": "Sources:\n{context}\nQ: {question}\nA:", "chunk_template": "[{n}] {text}"}


def cfg(prompt_budget: int) -> PromptConfig:
    return PromptConfig(**CONFIG, context_window_tokens=prompt_budget + 10, max_output_tokens=10)


def test_chunks_are_numbered_in_rank_order_and_the_lowest_ranked_dropped_first():
    a, b, c = chunk("a", 10), chunk("b", 30), chunk("c", 5)
    # bare prompt: "Sources: (no sources) Q: why A:" is 6 words; each chunk line is 1 + its words
    everything = assemble_prompt("why", [a, b, c], config=cfg(100), count_tokens=words)
    assert [x.ref for x in everything.citations] == ["a#0", "b#0", "c#0"] and everything.dropped == ()
    assert f"[1] {a.text}\n\n[2] {b.text}\n\n[3] {c.text}" in everything.text
    assert everything.prompt_tokens == words(everything.text) == 4 + 11 + 31 + 6
    # 30 tokens: a and c would fit together, but c ranks below b, so both go and a stands alone
    p = assemble_prompt("why", [a, b, c], config=cfg(30), count_tokens=words)
    assert [x.n for x in p.citations] == [1] and p.dropped == ("b#0", "c#0")
    assert p.text == f"Sources:\n[1] {a.text}\nQ: why\nA:" and not p.truncated and p.prompt_tokens <= 30
    exact = assemble_prompt("why", [a, b, c], config=cfg(4 + 11 + 31), count_tokens=words)  # one token short of c
    assert exact.dropped == ("c#0",) and exact.prompt_tokens == 46


def test_only_a_best_chunk_over_the_budget_alone_is_cut_at_a_word():
    big, small = chunk("big", 100), chunk("small", 3)
    p = assemble_prompt("why", [big, small], config=cfg(40), count_tokens=words)
    assert p.truncated and [x.ref for x in p.citations] == ["big#0"] and p.dropped == ("small#0",)
    kept = p.text.split("[1] ", 1)[1].split(" ...", 1)[0]
    assert big.text.startswith(kept + " ") and p.prompt_tokens == 40  # the longest prefix that fits
    none = assemble_prompt("why", [chunk("x", 50)], config=cfg(6), count_tokens=words)  # bare prompt: 6
    assert none.citations == () and none.dropped == ("x#0",) and "(no sources)" in none.text


def test_citations_resolve_to_sources_and_markers_to_nothing_are_dropped():
    cites = [Citation(1, "net/http.py", 0, "/corpus/net/http.py"), Citation(2, "db/sqlite.py", 3, "/corpus/db/sqlite.py")]
    r = resolve_citations("Use a jar [2]. Commit first [1, 7] and [9]. Again [2][1].", cites)
    assert r.text == "Use a jar [2]. Commit first [1] and. Again [2][1]."
    assert [c.ref for c in r.sources] == ["db/sqlite.py#3", "net/http.py#0"]
    assert r.sources[0].source == "/corpus/db/sqlite.py" and r.unresolved == (7, 9)
    assert resolve_citations("no markers here", cites).sources == ()


def test_bad_questions_and_configs_name_the_field():
    config = cfg(20)
    for bad, message in [("", "question: empty"), ("   ", "question: empty"), (42, "question: expected text"),
                         ("x" * 4001, "question: 4001 characters, over max_question_chars=4000"),
                         (" ".join(["w"] * 30), "question: the prompt without sources is 35 tokens")]:
        with pytest.raises(ValueError, match=message):
            assemble_prompt(bad, [chunk("a", 1)], config=config, count_tokens=words)
    with pytest.raises(ConfigError) as err:
        parse_config(PromptConfig, {"template": "no slots", "chunk_template": "{text}", "context_window_tokens": 100,
                                    "max_output_tokens": 100}, source="prompt")
    text = str(err.value)
    assert "template: must contain {context} exactly once" in text and "{question}" in text
    assert "chunk_template: must contain {n}" in text and "context_window_tokens=100" in text
