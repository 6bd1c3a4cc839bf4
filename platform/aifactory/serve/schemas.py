"""OpenAI-compatible request/response models and the JSON error body.

Requests are validated here (types, ranges, unknown fields); limits that depend on the deployment (prompt
length in tokens, ``max_tokens`` cap, known models) are checked by :func:`check_completion_limits`. Every
problem becomes an :class:`APIError` whose JSON body names the field, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "..."}}

Why every field is bounded here: requests of many tenants share one ``@serve.batch`` call, so a value that
made the model raise (a seed past 2**64, a temperature of 1e-300, a lone surrogate the tokenizer cannot
encode) used to fail every co-batched request with a 500. :func:`parse_body` rejects such input with a 400
before it reaches a batch, and bounds what parsing itself may cost (body bytes, JSON nesting).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from itertools import accumulate
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_BODY_BYTES = 1 << 20
"""Default request-body limit of :func:`parse_body`; the apps pass their own (``max_body_bytes`` in their args)."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of JSON arrays/objects a body may have. The schemas need 2; CPython's parser recurses per
level and raises RecursionError (a 500) at 1000, and pydantic walks what it is given, so deep input stops here."""
MIN_TEMPERATURE = 1e-3
"""Smallest non-zero temperature. Below it sampling is greedy in all but name, and near float32's limits
``logits / temperature`` overflows (1e-300 rounds to 0), the probabilities become NaN and ``torch.multinomial``
raises. The largest stays OpenAI's 2."""
MAX_SEED = 2**63
"""Seeds are ``0 <= seed < 2**63``: ``torch.Generator.manual_seed`` raises on values past 64 bits."""
MAX_STOPS = 4
"""Most stop sequences a request may give (OpenAI's limit)."""
MAX_STOP_CHARS = 128
"""Longest stop sequence: a stream holds back as many characters as the longest stop, so a long one stalls it."""
MAX_NAME_CHARS = 256
"""Longest ``model`` or ``user`` string."""


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped JSON body; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = "invalid_request",
                 type_: str | None = None, headers: dict[str, str] | None = None):
        # Text from a request (a field name, a model name) may hold lone surrogates; escaped, the body always
        # encodes as UTF-8, so rendering an error can never itself fail with a 500.
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):
        return (_rebuild_api_error, (self.status, self.message, self.param, self.code, self.type, self.headers))


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _rebuild_api_error(status, message, param, code, type_, headers):
    return APIError(status, message, param=param, code=code, type_=type_, headers=headers)


class _Request(BaseModel):
    # OpenAI clients send a few fields we do not use (e.g. "user"); unknown ones are errors so typos show.
    # NaN and infinity (Python's JSON parser accepts them) are refused as not finite; range checks alone would
    # call NaN "greater than 2".
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)


_Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
_StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class CompletionRequest(_Request):
    model: _Name = Field(description="Model name, or name:version.")
    prompt: str | list[str] = Field(description="The prompt (a list must hold exactly one string).")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate (at most the deployment's limits.max_tokens).")
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description=f"Sampling temperature: 0 is greedy, else {MIN_TEMPERATURE:g} to 2."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Accepted for compatibility; only 1.0 is supported.")
    seed: int | None = Field(
        None, ge=0, lt=MAX_SEED,
        description="Sampling seed, 0 <= seed < 2**63: a fixed seed makes the answer deterministic.",
    )
    stream: bool = Field(False, description="Stream tokens as server-sent events.")
    n: int = Field(1, ge=1, le=1, description="Completions per prompt (only 1).")
    stop: _StopText | Annotated[list[_StopText], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"Stop generating at any of these strings (at most {MAX_STOPS}, "
                          f"each at most {MAX_STOP_CHARS} characters)."
    )
    user: _Name | None = Field(None, description="End-user id (ignored).")

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sane(cls, t: float) -> float:
        if 0.0 < t < MIN_TEMPERATURE:
            raise ValueError(f"{t:g} is below {MIN_TEMPERATURE:g}; use 0 for greedy decoding")
        return t

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, f"prompt: a list must hold exactly one string, got {len(self.prompt)}",
                               param="prompt", code="invalid_prompt")
            return self.prompt[0]
        return self.prompt

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0.0 or self.seed is not None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] = "length"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="name:version that answered, plus cache source.")


MAX_MESSAGES = 256
"""Most messages one chat request may hold."""


class TextPart(_Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The part's text.")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks ('developer' is rendered as 'system').")
    content: str | list[TextPart] = Field(description="The message's text, or a list of text parts (joined).")
    name: _Name | None = Field(None, description="Speaker name (ignored).")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = Field(True, description="Accepted; the last chunk always carries usage.")


class ChatCompletionRequest(CompletionRequest):
    """``POST /v1/chat/completions``: the completion fields, with ``messages`` instead of ``prompt``."""

    prompt: None = Field(None, exclude=True, description="Not a chat field: use messages.")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description=f"The conversation so far (1 to {MAX_MESSAGES} messages), rendered through the chat template.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Newer name of max_tokens (the same limit); give one of the two.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set and self.max_tokens != self.max_completion_tokens:
                raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                 f"({self.max_completion_tokens}) disagree; give one")
            self.max_tokens = self.max_completion_tokens
        return self


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] = "length"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="name:version that answered, plus cache source.")


class EmbeddingRequest(_Request):
    model: _Name = Field(description="Embedding model name.")
    input: str | list[str] = Field(description="Text or list of texts to embed.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes (the openai client's default)."
    )
    dimensions: int | None = Field(None, description="Accepted only if equal to the model's dimensions.")
    user: _Name | None = Field(None, description="End-user id (ignored).")

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "aifactory"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


async def read_body(request, *, max_body_bytes: int) -> bytes:
    """A request's body (a Starlette ``Request``), refused with a 413 as soon as it passes ``max_body_bytes``:
    a declared Content-Length over the limit is refused unread, a streamed body once it has sent too much."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise _body_too_large(int(declared), max_body_bytes)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_body_bytes:
            raise _body_too_large(n, max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(n: int, limit: int) -> APIError:
    return APIError(413, f"body: {n} bytes is over this deployment's limit of {limit} (max_body_bytes)",
                    param="body", code="body_too_large")


def parse_body(model: type[BaseModel], raw: bytes, *, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """Parse a request body: too large (413), not UTF-8, malformed or too deeply nested JSON, text that is
    not valid Unicode, or a bad field becomes a 4xx naming the field."""
    raw = raw or b""
    if len(raw) > max_body_bytes:
        raise _body_too_large(len(raw), max_body_bytes)
    try:
        # RFC 8259 JSON between systems is UTF-8; decoding first also keeps json.loads from guessing UTF-16/32,
        # whose bytes the depth scan below would misread.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"body: not UTF-8 ({err})", param="body", code="invalid_json") from None
    depth = json_depth(raw, limit=MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", param="body",
                       code="json_too_deep")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise APIError(400, f"body: malformed JSON ({err})", param="body", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"body: expected a JSON object, got {type(data).__name__}", param="body",
                       code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and (path := lone_surrogate_path(data)) is not None:
        raise APIError(400, f"{'.'.join(map(str, path))}: contains a lone UTF-16 surrogate (a \\ud800-\\udfff "
                            "escape without its pair), which is not valid Unicode text", param=str(path[0]),
                       code="invalid_unicode")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_to_api_error(err) from None


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes, *, limit: int) -> int:
    """How deep arrays and objects nest in the UTF-8 JSON ``raw`` (brackets inside strings do not count),
    or 0 when ``raw`` holds too few brackets to nest deeper than ``limit`` (the usual body, answered at once).

    It never recurses and runs in C-speed passes (a 1 MiB body of brackets takes tens of milliseconds), so a
    body is measured before the recursive parser sees it. Malformed JSON may measure wrong; the parser refuses it."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


# Raw UTF-8 cannot hold a surrogate (decoding refuses it); only a \uD800-\uDFFF escape can make one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(value: Any, path: tuple = ()) -> tuple | None:
    """The path (keys and list indices) of the first string in parsed JSON holding a lone surrogate, or None.

    Such a string is not valid Unicode: encoding it as UTF-8 raises (in the tokenizer, in the JSON response),
    so it must be refused as bad input before any model or error path encodes it. JSON's escaped pairs
    (``\\ud83d\\ude00``) arrive combined into one character and pass."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, v in value.items():
            if _SURROGATE.search(key):
                return (*path, key)
            if (found := lone_surrogate_path(v, (*path, key))) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := lone_surrogate_path(v, (*path, i))) is not None:
                return found
    return None


def validation_to_api_error(err: ValidationError) -> APIError:
    """The first problem names the field; all problems appear in the message."""
    problems = []
    first_param = None
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if p not in ("body",)) or "body"
        # For unions pydantic appends the tried type ("prompt.str"); the field is the first element.
        param = str(e["loc"][0]) if e["loc"] else "body"
        first_param = first_param or param
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{loc}: {msg}")
    return APIError(400, "; ".join(dict.fromkeys(problems)), param=first_param, code="invalid_field")


def check_completion_limits(req: CompletionRequest, *, prompt_tokens: int, max_prompt_tokens: int,
                            max_tokens_limit: int, prompt_param: str = "prompt") -> None:
    """The deployment's limits (``prompt_param``: the field the prompt came from, ``messages`` for chat)."""
    if req.max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens: {req.max_tokens} is over this deployment's limit of {max_tokens_limit}",
                       param="max_tokens", code="max_tokens_over_limit")
    if prompt_tokens > max_prompt_tokens:
        raise APIError(400, f"{prompt_param}: {prompt_tokens} tokens is over the limit of {max_prompt_tokens}",
                       param=prompt_param, code="prompt_too_long")
    if prompt_tokens == 0:
        raise APIError(400, f"{prompt_param}: must not be empty", param=prompt_param, code="prompt_empty")
    if req.top_p != 1.0:
        raise APIError(400, "top_p: only 1.0 is supported", param="top_p", code="unsupported")


def encode_vector(v, fmt: str):
    """An embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if fmt == "base64":
        import base64

        import numpy as np

        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
    return [float(x) for x in v]
