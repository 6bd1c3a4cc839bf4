"""The chat template: how ``/v1/chat/completions`` turns a list of messages into the prompt the model continues.

The factory's models are byte-level decoders trained on plain text, with no special tokens, so the template is
plain text too. Each message becomes a role line and its content, and the prompt ends with the assistant's
role line, which the model continues::

    <|system|>
    You are a careful Python assistant.
    <|user|>
    Write a function that adds two numbers.
    <|assistant|>

(``developer`` messages render as ``system``.) The answer ends at :data:`TURN_STOP`, where the model starts
the next turn's role line, as well as at the request's own ``stop`` sequences, at ``max_tokens`` and at the
model's end of text. Content is inserted as it is: a message that writes ``<|user|>`` itself makes a turn of
its own, which matters only to the conversation that wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence

from aifactory.serve.schemas import ChatMessage

TURN_STOP = "<|"
"""Every chat answer also stops here: the start of the next role line."""

_ROLE = {"developer": "system"}


def render(messages: Sequence[ChatMessage]) -> str:
    """The prompt for ``messages``: each one as ``<|role|>\\n{content}\\n``, then ``<|assistant|>\\n``."""
    turns = [f"<|{_ROLE.get(m.role, m.role)}|>\n{m.text()}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"
