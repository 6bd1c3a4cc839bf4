"""OpenAI-compatible request/response models and the JSON error body.

Requests are validated here (types, ranges, unknown fields); limits that depend on the deployment (prompt
length in tokens, ``max_tokens`` cap, known models) are checked by :func:`check_completion_limits`. Every
problem becomes an :class:`APIError` whose JSON body names the field, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "..."}}
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped JSON body; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = "invalid_request",
                 type_: str | None = None, headers: dict[str, str] | None = None):
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


def _rebuild_api_error(status, message, param, code, type_, headers):
    return APIError(status, message, param=param, code=code, type_=type_, headers=headers)


class _Request(BaseModel):
    # OpenAI clients send a few fields we do not use (e.g. "user"); unknown ones are errors so typos show.
    model_config = ConfigDict(extra="forbid", strict=False)


class CompletionRequest(_Request):
    model: str = Field(description="Model name, or name:version.")
    prompt: str | list[str] = Field(description="The prompt (a list must hold exactly one string).")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Accepted for compatibility; only 1.0 is supported.")
    seed: int | None = Field(None, description="Sampling seed: a fixed seed makes the answer deterministic.")
    stream: bool = Field(False, description="Stream tokens as server-sent events.")
    n: int = Field(1, ge=1, le=1, description="Completions per prompt (only 1).")
    stop: str | list[str] | None = Field(None, description="Stop generating at any of these strings.")
    user: str | None = Field(None, description="End-user id (ignored).")

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


class EmbeddingRequest(_Request):
    model: str = Field(description="Embedding model name.")
    input: str | list[str] = Field(description="Text or list of texts to embed.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes (the openai client's default)."
    )
    dimensions: int | None = Field(None, description="Accepted only if equal to the model's dimensions.")
    user: str | None = Field(None, description="End-user id (ignored).")

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


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Parse a request body: malformed JSON or a bad field becomes a 400 naming the field."""
    try:
        data = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"body: malformed JSON ({err})", param="body", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"body: expected a JSON object, got {type(data).__name__}", param="body",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_to_api_error(err) from None


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
                            max_tokens_limit: int) -> None:
    if req.max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens: {req.max_tokens} is over this deployment's limit of {max_tokens_limit}",
                       param="max_tokens", code="max_tokens_over_limit")
    if prompt_tokens > max_prompt_tokens:
        raise APIError(400, f"prompt: {prompt_tokens} tokens is over the limit of {max_prompt_tokens}",
                       param="prompt", code="prompt_too_long")
    if prompt_tokens == 0:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="prompt_empty")
    if req.top_p != 1.0:
        raise APIError(400, "top_p: only 1.0 is supported", param="top_p", code="unsupported")


def encode_vector(v, fmt: str):
    """An embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if fmt == "base64":
        import base64

        import numpy as np

        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
    return [float(x) for x in v]
