"""Token streams as OpenAI server-sent events: incremental text, stop sequences, chunk format.

Pure Python (no Ray, no torch), so the text logic is unit-tested on its own. The completions ingress feeds
:class:`TextStream` the token ids of each decode step and sends what it returns as a chunk at once; the text
of all chunks together equals the non-streamed answer's text (same UTF-8 decoding, same stop-sequence cut).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import Any

DONE = "data: [DONE]\n\n"


def stop_scan(text: str, stops: list[str], *, final: bool) -> tuple[int, bool]:
    """``(n, stopped)``: ``text[:n]`` can be sent now; ``stopped`` when a stop sequence begins at ``n``.

    The earliest stop wins, as in the non-streamed answer, so text from which a stop sequence could still
    begin (a suffix of ``text`` that is a prefix of a stop) is held back until more text decides it."""
    stops = [s for s in stops if s]
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if final:
        return (cut, True) if cut >= 0 else (len(text), False)
    longest = max((len(s) for s in stops), default=0)
    undecided = next((j for j in range(max(0, len(text) - longest + 1), len(text))
                      if any(s.startswith(text[j:]) for s in stops)), len(text))
    if 0 <= cut <= undecided:
        return cut, True
    return undecided, False


class TextStream:
    """Turns a request's token ids, step by step, into the text deltas to send."""

    def __init__(self, stops: list[str]):
        # Byte tokens: a multi-byte character may span steps; the incremental decoder holds its start back
        # and decodes exactly as ``bytes.decode("utf-8", errors="replace")`` of the whole answer would.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = list(stops)
        self.text = ""  # decoded so far
        self.sent = 0  # characters of ``text`` already sent
        self.stopped = False

    def feed(self, token_ids: Iterable[int], *, final: bool = False) -> str:
        """The text that may be sent after these tokens (``""`` if none yet); nothing more once stopped."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(bytes(t for t in token_ids if 0 <= t < 256), final=final)
        n, self.stopped = stop_scan(self.text, self._stops, final=final)
        out = self.text[self.sent:n]
        self.sent = max(self.sent, n)
        return out

    @property
    def answer(self) -> str:
        """The whole answer's text (after a stop: up to it)."""
        return self.text[:self.sent] if self.stopped else self.text


def sse_chunk(head: dict[str, Any], text: str, finish_reason: str | None = None,
              usage: dict[str, int] | None = None) -> str:
    """One ``data:`` event in OpenAI's completion-chunk shape (``head``: id, object, created, model, ...)."""
    chunk = dict(head) | {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


def sse_error(message: str, code: str) -> str:
    """An error after the stream began (the status line is already sent): an error event, then the stream ends."""
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': code}})}\n\n"
