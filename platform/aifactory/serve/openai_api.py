"""What differs between the two generation APIs the completions ingress answers, and nothing else.

``/v1/completions`` and ``/v1/chat/completions`` share the whole request path of
:mod:`aifactory.serve.apps.completions` (tenancy, rate limits, admission, limits, caches, the model call,
usage metering); they differ only in how a request becomes a prompt and how an answer is written: the request
schema, the prompt (a string, or messages through :mod:`aifactory.serve.chat`), the stop sequences, the
response and chunk shapes, and how a cached answer is replayed as a stream. Each API is one small object
with those parts; the ingress is written once against them. Pure Python (pydantic), unit-tested on its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from aifactory.serve import chat
from aifactory.serve.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from aifactory.serve.streaming import DONE, sse_chunk, stop_scan

__all__ = ["CHAT", "COMPLETIONS", "ChatAPI", "CompletionsAPI", "apply_stop"]


def apply_stop(text: str, stops: list[str], finish: str) -> tuple[str, str]:
    """A whole answer cut at its first stop sequence (the streamed answer's cut, so both agree by construction)."""
    n, stopped = stop_scan(text, stops, final=True)
    return (text[:n], "stop") if stopped else (text, finish)


def _sse(data: dict[str, Any]) -> str:
    import json

    return f"data: {json.dumps(data)}\n\n"


class CompletionsAPI:
    """``POST /v1/completions``: a prompt string, answers as ``text_completion``."""

    name = "completions"
    request_cls: type[CompletionRequest] = CompletionRequest
    response_cls: type[BaseModel] = CompletionResponse
    prompt_param = "prompt"

    def prompt(self, req: CompletionRequest) -> str:
        return req.prompt_text()

    def stops(self, req: CompletionRequest) -> list[str]:
        return req.stop_list()

    def head(self, req: CompletionRequest) -> dict[str, Any]:
        """The fields every chunk of one stream carries (and its final answer keeps)."""
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}

    def response(self, req: CompletionRequest, *, text: str, finish: str, usage: Usage, fingerprint: str,
                 head: dict[str, Any] | None = None) -> BaseModel:
        return CompletionResponse(**(head or {}) | {
            "model": req.model, "choices": [CompletionChoice(text=text, finish_reason=finish)], "usage": usage,
            "system_fingerprint": fingerprint})

    def opening(self, head: dict[str, Any]) -> str | None:
        """A chunk sent before the first text (None: none)."""
        return None

    def chunk(self, head: dict[str, Any], text: str, finish: str | None = None,
              usage: dict[str, int] | None = None) -> str:
        return sse_chunk(head, text, finish, usage=usage)

    def answer_text(self, resp: BaseModel) -> str:
        return resp.choices[0].text

    def cached(self, body: dict, source: str) -> BaseModel:
        """A cache entry as this API's answer, marked with the cache it came from."""
        resp = self.response_cls.model_validate(body)
        return resp.model_copy(update={"system_fingerprint": f"{resp.system_fingerprint}+{source}-cache"})

    async def replay(self, resp: BaseModel) -> AsyncIterator[str]:
        """A cached answer as server-sent events (it is ready, so chunks are per character)."""
        head = resp.model_dump(exclude={"choices", "usage"})
        head["object"] = self.head_object(head)
        if (first := self.opening(head)) is not None:
            yield first
        for ch in self.answer_text(resp):
            yield self.chunk(head, ch)
        yield self.chunk(head, "", resp.choices[0].finish_reason, usage=resp.usage.model_dump())
        yield DONE

    def head_object(self, head: dict[str, Any]) -> str:
        return head["object"]


class ChatAPI(CompletionsAPI):
    """``POST /v1/chat/completions``: messages through :func:`aifactory.serve.chat.render`; answers as
    ``chat.completion``, streams as ``chat.completion.chunk`` (a first chunk with the role, then content)."""

    name = "chat"
    request_cls = ChatCompletionRequest
    response_cls = ChatCompletionResponse
    prompt_param = "messages"

    def prompt(self, req: ChatCompletionRequest) -> str:
        return chat.render(req.messages)

    def stops(self, req: ChatCompletionRequest) -> list[str]:
        return [*req.stop_list(), chat.TURN_STOP]

    def head(self, req: ChatCompletionRequest) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model}

    def response(self, req: ChatCompletionRequest, *, text: str, finish: str, usage: Usage, fingerprint: str,
                 head: dict[str, Any] | None = None) -> BaseModel:
        keep = {k: v for k, v in (head or {}).items() if k in ("id", "created")}  # the stream's id, not its object
        choice = ChatChoice(message=ChatChoiceMessage(content=text), finish_reason=finish)
        return ChatCompletionResponse(**keep | {"model": req.model, "choices": [choice], "usage": usage,
                                                "system_fingerprint": fingerprint})

    def opening(self, head: dict[str, Any]) -> str | None:
        return self._chunk(head, {"role": "assistant", "content": ""}, None)

    def chunk(self, head: dict[str, Any], text: str, finish: str | None = None,
              usage: dict[str, int] | None = None) -> str:
        return self._chunk(head, {"content": text} if text else {}, finish, usage)

    def _chunk(self, head: dict[str, Any], delta: dict, finish: str | None, usage: dict | None = None) -> str:
        data = dict(head) | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage
        return _sse(data)

    def answer_text(self, resp: BaseModel) -> str:
        return resp.choices[0].message.content

    def head_object(self, head: dict[str, Any]) -> str:
        return "chat.completion.chunk"


COMPLETIONS = CompletionsAPI()
CHAT = ChatAPI()
