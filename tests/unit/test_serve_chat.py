"""/v1/chat/completions without Ray: the chat template, the request schema, and the answer and chunk shapes
(checked against the `openai` client's own types)."""

from __future__ import annotations

import asyncio
import json

import pytest

from aifactory.serve.chat import TURN_STOP, render
from aifactory.serve.openai_api import CHAT, COMPLETIONS
from aifactory.serve.schemas import APIError, ChatCompletionRequest, Usage, parse_body


def _req(**kw) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]} | kw
    return ChatCompletionRequest.model_validate(body)


def test_the_template_renders_roles_and_ends_with_the_assistants_turn():
    req = _req(messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert render(req.messages) == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n"
                                    "<|user|>\nBye\n<|assistant|>\n")
    assert CHAT.prompt(_req()) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_chat_answers_stop_at_the_next_turn_as_well_as_at_the_requests_stops():
    assert CHAT.stops(_req(stop=["\n\n"])) == ["\n\n", TURN_STOP]
    assert COMPLETIONS.stops(_req(stop=["\n\n"])) == ["\n\n"]


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages"),
    ({"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "max_completion_tokens": 5},
     "body"),
])
def test_bad_chat_requests_are_400_naming_the_field(body, param):
    with pytest.raises(APIError) as err:
        parse_body(ChatCompletionRequest, json.dumps(body).encode())
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_max_completion_tokens_is_max_tokens():
    assert _req(max_completion_tokens=7).max_tokens == 7


def test_answer_and_chunks_parse_as_the_openai_clients_types():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    req = _req()
    head = CHAT.head(req)
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    resp = CHAT.response(req, text="ok", finish="stop", usage=usage, fingerprint="m:v1", head=head)
    parsed = ChatCompletion.model_validate(resp.model_dump())
    assert parsed.id == head["id"] and parsed.choices[0].message.content == "ok" and parsed.object == "chat.completion"
    events = [CHAT.opening(head), CHAT.chunk(head, "o"), CHAT.chunk(head, "k"),
              CHAT.chunk(head, "", "stop", usage=usage.model_dump())]
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.removeprefix("data: "))) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ok"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens == 5


def test_a_cached_chat_answer_replays_as_chat_chunks():
    from openai.types.chat import ChatCompletionChunk

    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    resp = CHAT.response(_req(), text="ok", finish="length", usage=usage, fingerprint="m:v1")
    hit = CHAT.cached(resp.model_dump(), "exact")
    assert hit.system_fingerprint == "m:v1+exact-cache"

    async def collect():
        return [e async for e in CHAT.replay(hit)]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e.removeprefix("data: "))) for e in events[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ok"
    assert chunks[-1].choices[0].finish_reason == "length"
