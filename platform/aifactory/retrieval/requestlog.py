"""The copilot's request log: one JSON line per request, per tenant per UTC day, kept for a retention period.

Layout: ``<root>/<tenant>/<YYYY-MM-DD>.jsonl``. Each line is a :class:`RequestRecord`: the request id, tenant,
per-stage timings in ms, status, token counts, the moderation decision and the cited sources. Text (the question,
the answer, an error message) is stored only after :func:`~aifactory.retrieval.moderation.redact`, whatever
moderation allowed through, so no raw secret or PII is ever written; ``store_text=False`` stores none at all.

A line is written with one ``write`` on a file opened ``O_APPEND``, so concurrent requests of one replica never
interleave within a line. :meth:`RequestLog.purge` deletes day files wholly past ``retention_days``; a tenant
reads only its own log (:meth:`RequestLog.read` refuses another tenant's with
:class:`~aifactory.exceptions.PermissionDenied`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from aifactory.config import StrictModel, parse_config
from aifactory.exceptions import PermissionDenied
from aifactory.retrieval.moderation import redact
from aifactory.tenancy import TenantName

_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")


class RequestLogConfig(StrictModel):
    """Where the request log keeps what, and for how long."""

    retention_days: int = Field(30, ge=1, le=3650, description="Days a request's record is kept; purge() deletes "
                                "day files older than this.")
    store_text: bool = Field(True, description="Store the (redacted) question and answer; False: metadata only.")
    max_text_chars: int = Field(4000, ge=0, description="Stored text is cut to this many characters (after "
                                "redaction, so a cut never splits a placeholder's secret back into view).")


class RequestRecord(StrictModel):
    """One copilot request, as the log stores it."""

    request_id: str = Field(min_length=1, max_length=128, description="The request's id (the response carries it).")
    tenant: TenantName = Field(description="The tenant the request authenticated as.")
    ts_s: float = Field(ge=0, description="Epoch seconds the request arrived (its day names the file).")
    status: Literal["ok", "refused", "rejected", "error"] = Field(
        description="'ok': answered; 'refused': moderation answered with a refusal; 'rejected': a 4xx (bad input, "
        "rate limit); 'error': the server failed.")
    http_status: int = Field(ge=100, le=599, description="The HTTP status answered.")
    stage_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage (auth, embed, "
                                       "retrieve, prompt, generate, moderate, postprocess, log).")
    prompt_tokens: int = Field(0, ge=0, description="Tokens of the assembled prompt.")
    completion_tokens: int = Field(0, ge=0, description="Tokens generated.")
    moderation: Literal["allow", "redact", "refuse", "skipped"] = Field(
        "skipped", description="The strictest moderation action over input and output.")
    moderation_reasons: list[str] = Field(default_factory=list, description="Why (kinds of findings, never them).")
    cited_sources: list[str] = Field(default_factory=list, description="Sources the answer cited, in order.")
    question: str | None = Field(None, description="The question, redacted before it is written.")
    answer: str | None = Field(None, description="The answer, redacted before it is written.")
    error: str | None = Field(None, description="One line on what failed, redacted before it is written.")


class _TenantName(StrictModel):
    tenant: TenantName = Field(description="A tenant name (the rules of aifactory.tenancy).")


def _day(ts_s: float) -> str:
    return dt.datetime.fromtimestamp(ts_s, dt.UTC).date().isoformat()


class RequestLog:
    """Append-only JSONL request records under ``root``, one directory per tenant."""

    def __init__(self, root: str | Path, config: RequestLogConfig | None = None):
        self.root = Path(root)
        self.config = config or RequestLogConfig()

    def _stored_text(self, text: str | None) -> str | None:
        if text is None or not self.config.store_text:
            return None
        return redact(text)[: self.config.max_text_chars]

    def append(self, record: RequestRecord) -> Path:
        """Write one record (its text redacted) to its tenant's file of its UTC day; returns the file."""
        record = RequestRecord.model_validate(record.model_dump())  # a record built with model_construct: checked
        stored = record.model_copy(update={
            "question": self._stored_text(record.question), "answer": self._stored_text(record.answer),
            # an error message may quote the input; reasons and sources are redacted too, to be sure
            "error": None if record.error is None else redact(record.error)[:1000],
            "moderation_reasons": [redact(r) for r in record.moderation_reasons],
            "cited_sources": [redact(s) for s in record.cited_sources],
        })
        path = self.root / record.tenant / f"{_day(record.ts_s)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (stored.model_dump_json() + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write per line: concurrent appenders do not interleave within it
        finally:
            os.close(fd)
        return path

    def read(self, tenant: str, *, caller: str, day: str | None = None) -> list[RequestRecord]:
        """``tenant``'s records (of one UTC ``day``, 'YYYY-MM-DD', or all kept), for ``caller``, which must be
        that tenant."""
        if caller != tenant:
            raise PermissionDenied(f"tenant {caller!r} may read only its own request log, not tenant {tenant!r}'s")
        parse_config(_TenantName, {"tenant": tenant}, source="request log read")  # never a path like '../x'
        if day is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            raise ValueError(f"day: a UTC date as YYYY-MM-DD (got {day!r})")
        folder = self.root / tenant
        files = [folder / f"{day}.jsonl"] if day else sorted(p for p in folder.glob("*.jsonl")
                                                               if _DAY_FILE.match(p.name))
        out = []
        for path in files:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                if line.strip():
                    record = RequestRecord.model_validate_json(line)
                    if record.tenant == tenant:
                        out.append(record)
        return out

    def purge(self, now: float | None = None) -> list[Path]:
        """Delete every day file whose whole day ended more than ``retention_days`` before ``now`` (epoch seconds,
        default: the current time); returns the files deleted."""
        now = time.time() if now is None else now
        cutoff = now - self.config.retention_days * 86400
        deleted = []
        if not self.root.exists():
            return deleted
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                m = _DAY_FILE.match(path.name)
                if not m:
                    continue
                day_end = (dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
                           + dt.timedelta(days=1)).timestamp()
                if day_end <= cutoff:
                    path.unlink()
                    deleted.append(path)
        return deleted
