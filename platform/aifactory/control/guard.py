"""What the control API checks before a route sees a request: names, body size and shape, rate.

- **Names** in paths, queries and bodies (applications, models, versions, job ids) match a strict pattern
  (:func:`check_name`): ``../cluster/cluster.json``, ``../audit.sqlite``, a NUL byte or a slash never reach
  a file path, a Serve config or SQLite; a bad one answers **400** naming the field.
- **Bodies** (:class:`InputGuard`, an ASGI middleware): at most ``max_body_bytes`` (default 1 MiB; more is
  **413**, whether announced by ``Content-Length`` or streamed), JSON nested at most ``max_json_depth`` deep
  (default 32), no NUL and no lone surrogate in any JSON string, a path and query that are valid UTF-8
  without NUL: else **400** naming the field. (Python's JSON parser raises ``RecursionError`` on JSON
  nested ~1000 deep, which FastAPI would answer with a 500.)
- **Rate** (:class:`KeyRateLimiter`): a token bucket per API key (default 20 requests/s, burst 60) and per
  client address for failed authentications (default 20/s, burst 200); over it, **429** with ``Retry-After``.
  Buckets live per replica of the control API, so the cluster-wide limit is the replica count times this.

Pure Python (no Ray): unit-tested in ``tests/unit/test_control_input.py``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aifactory.exceptions import FactoryError

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
PATTERNS: dict[str, re.Pattern[str]] = {
    # <tenant>.<name> for tenants' apps; one label for the operators' apps
    "app": re.compile(rf"^{_LABEL}(?:\.{_LABEL})?$"),
    # the registry's model names: lowercase, digits, '.', '_', '-'; no '..', no '/'
    "model_name": re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,126}[a-z0-9])?$"),
    "model_version": re.compile(r"^v[0-9]{1,9}$"),
    # Ray submission ids (raysubmit_...) and job ids (hex)
    "job_id": re.compile(r"^[A-Za-z0-9_-]{1,128}$"),
}


class InvalidInput(FactoryError):
    """A request field that the control API refuses before acting (HTTP 400, ``fields`` names it)."""

    def __init__(self, field: str, message: str, status: int = 400):
        self.field, self.message, self.status = field, message, status
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        return (type(self), (self.field, self.message, self.status))


class RateLimited(FactoryError):
    """Too many requests from one API key (or failed authentications from one address): HTTP 429."""

    def __init__(self, who: str, retry_after_s: float):
        self.who, self.retry_after_s = who, retry_after_s
        super().__init__(f"too many requests from {who}; retry in {math.ceil(retry_after_s)}s")

    def __reduce__(self):
        return (type(self), (self.who, self.retry_after_s))


def check_name(field: str, value: str | None, kind: str | None = None) -> str | None:
    """``value`` if it is a valid ``kind`` name (default: ``field``); ``None`` passes; else :class:`InvalidInput`."""
    if value is None:
        return None
    kind = kind or field
    pattern = PATTERNS[kind]
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        shown = repr(value[:80]) if isinstance(value, str) else type(value).__name__
        raise InvalidInput(field, f"{shown} is not a valid {kind.replace('_', ' ')} (pattern {pattern.pattern})")
    return value


# ---- JSON shape ----------------------------------------------------------------------------------------

def json_depth(raw: bytes) -> int:
    """The nesting depth of a JSON text, counted without parsing (brackets outside strings)."""
    depth = deepest = 0
    in_str = esc = False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _bad_text(s: str) -> str | None:
    if "\x00" in s:
        return "contains a NUL character"
    for ch in s:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return "contains a lone surrogate (invalid Unicode)"
    return None


def find_bad_string(value: Any, path: str = "body") -> tuple[str, str] | None:
    """(field path, problem) of the first JSON string (key or value) with a NUL or a lone surrogate."""
    if isinstance(value, str):
        problem = _bad_text(value)
        return (path, problem) if problem else None
    if isinstance(value, dict):
        for k, v in value.items():
            problem = _bad_text(k)
            if problem:
                return (f"{path}.{k.encode('utf-8', 'backslashreplace').decode()[:40]}", problem)
            found = find_bad_string(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_bad_string(v, f"{path}.{i}")
            if found:
                return found
    return None


def check_body(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a JSON body nested deeper than ``max_depth`` or carrying a NUL or lone surrogate in a string.
    A body that is not JSON at all is left to the route (FastAPI answers 422 naming ``body``)."""
    if not raw.strip():
        return
    if json_depth(raw) > max_depth:
        raise InvalidInput("body", f"JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return
    found = find_bad_string(value)
    if found:
        raise InvalidInput(found[0], found[1])


def check_url(raw_path: bytes, query: bytes) -> None:
    """The path and query must be valid UTF-8 once percent-decoded, with no NUL."""
    from urllib.parse import unquote_to_bytes

    for what, raw in (("path", raw_path), ("query", query)):
        decoded = unquote_to_bytes(raw)
        if b"\x00" in decoded:
            raise InvalidInput(what, "contains a NUL character")
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(what, "is not valid UTF-8") from None
        if _bad_text(text):
            raise InvalidInput(what, _bad_text(text) or "")


class InputGuard:
    """ASGI middleware: the URL, size and JSON-shape checks above, answered as the API's JSON errors."""

    def __init__(self, app, *, max_body_bytes: int = MAX_BODY_BYTES, max_json_depth: int = MAX_JSON_DEPTH,
                 raw_bodies: dict[str, int] | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        # Paths (suffixes) that take an application/octet-stream body up to their own bound, not JSON
        # (model weights to POST /v1/models/register); other content types there get the JSON rules.
        self.raw_bodies = dict(raw_bodies or {})

    def _raw_limit(self, scope) -> int | None:
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/octet-stream":
            return None
        path = scope.get("path", "")
        return next((n for suffix, n in self.raw_bodies.items() if path.endswith(suffix)), None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_url(scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape"),
                      scope.get("query_string") or b"")
            raw_limit = self._raw_limit(scope)
            limit = raw_limit or self.max_body_bytes
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None:
                if not length.isdigit():
                    raise InvalidInput("Content-Length", "is not a number")
                if int(length) > limit:
                    raise InvalidInput("body", f"larger than {limit} bytes", status=413)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise InvalidInput("body", f"larger than {limit} bytes", status=413)
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            if raw_limit is None:
                check_body(body, max_depth=self.max_json_depth)
        except InvalidInput as err:
            return await _send_error(send, err)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_error(send, err: InvalidInput) -> None:
    code = "payload_too_large" if err.status == 413 else "invalid_request"
    payload = json.dumps({"error": {"code": code, "message": str(err), "fields": [err.field]}}).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


# ---- rate ----------------------------------------------------------------------------------------------

class KeyRateLimiter:
    """Token buckets by key (an API key id, or ``addr:<client>`` for failed authentications), LRU-bounded."""

    def __init__(self, rps: float, burst: int, *, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if not (rps > 0 and burst >= 1):
            raise ValueError("rate limit: rps must be > 0 and burst >= 1")
        self.rps, self.burst, self.max_keys, self.clock = float(rps), int(burst), max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)
        self._lock = threading.Lock()  # sync routes run in a thread pool

    def take(self, key: str) -> float:
        """0.0 if ``key`` may go on now (a token is spent), else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rps)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rps
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait

    def check(self, key: str, who: str) -> None:
        wait = self.take(key)
        if wait > 0:
            raise RateLimited(who, wait)
