"""Asking a running training run to yield: the training side of preemption (issue 16, point 4).

When factory-lane work cannot start, the queue's dispatcher asks a learning-lane run to make room:
``request_yield(home, run_id)`` writes ``<home>/runs/<run_id>/yield-request.json`` (atomically, beside the run's
manifest). The worker loop's rank 0 stats that file after every step and broadcasts what it saw, so all ranks
stop after the same step; they save a DCP checkpoint there (the loop's own checkpoint code), report it and
return. The driver then records the run as ``preempted`` (manifest, front-door record) with that step and
raises :class:`aifactory.exceptions.Preempted`; ``factory train`` and ``python -m jobs.train`` exit with
:data:`PREEMPTED_EXIT_CODE`.

Running the run again with the same run id (``AIFACTORY_RUN_ID``, which the dispatcher sets on every dispatch,
or ``--run-id``) resumes from that checkpoint, skipping the batches already consumed, and clears the request
it honoured. A request written after the preemption is a new one, and is kept: the resumed run yields again
at its first step. A run that ends without yielding (finished, or failed) drops a request it never saw.

A file, not an actor or a Ray API: the request must outlive the driver, the dispatcher and the Ray head
(the queue survives their restarts), and checking it costs one ``stat`` per step. Light: imports no torch/Ray.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aifactory.exceptions import ConfigError, Preempted
from aifactory.home import FactoryHome

PREEMPTED_EXIT_CODE: int = Preempted.exit_code
"""Exit code of a training job process that yielded (75, EX_TEMPFAIL): re-queue it, do not count it failed."""

REQUEST_FILE = "yield-request.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class YieldRequest:
    """A pending request: why, when, and its id (so a resumed run clears only the request it honoured)."""

    reason: str
    requested_at: float | None
    request_id: str | None


def request_path(home: FactoryHome, run_id: str) -> Path:
    """Where the request for ``run_id`` lives: beside the run's manifest."""
    if not _RUN_ID.fullmatch(run_id or ""):
        raise ConfigError("yield request", [f"run_id: {run_id!r} is not a run id (letters, digits, '.', '_', '-'; "
                                            "at most 128; e.g. train-20261202-101500-a1b2c3)"])
    return home.runs_dir / run_id / REQUEST_FILE


def request_yield(home: FactoryHome, run_id: str, *, reason: str = "") -> None:
    """Ask run ``run_id`` to checkpoint and stop at its next step. Durable and idempotent: a second request
    replaces the first. The run may not have started yet; it then yields after its first step."""
    path = request_path(home, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"run_id": run_id, "reason": reason, "requested_at": time.time(), "request_id": secrets.token_hex(8)}
    tmp = path.with_name(f".{REQUEST_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)  # readers see the old request or the new one, never half of one


def read_request(home: FactoryHome, run_id: str) -> YieldRequest | None:
    """The pending request for ``run_id``, or None. A file that is not a readable request still counts as
    one (someone asked for room; yielding is the safe side), with the problem as its reason."""
    return _read(request_path(home, run_id))


def yield_requested(home: FactoryHome, run_id: str) -> str | None:
    """The reason of the pending request (``""`` when none was given), or None when there is none."""
    req = read_request(home, run_id)
    return None if req is None else req.reason


def clear_yield(home: FactoryHome, run_id: str, *, request_id: str | None = None) -> None:
    """Drop the pending request (no-op when there is none). With ``request_id``: only if it is that request,
    so a newer one, written after the run yielded, stays for the resumed run to honour."""
    path = request_path(home, run_id)
    if request_id is not None:
        req = _read(path)
        if req is None or req.request_id != request_id:
            return
    path.unlink(missing_ok=True)


def _read(path: Path) -> YieldRequest | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        body = json.loads(text)
        return YieldRequest(reason=str(body.get("reason") or ""), requested_at=body.get("requested_at"),
                            request_id=body.get("request_id"))
    except (ValueError, AttributeError) as err:
        return YieldRequest(reason=f"unreadable yield request {path}: {err}", requested_at=None, request_id=None)


__all__ = ["PREEMPTED_EXIT_CODE", "REQUEST_FILE", "YieldRequest", "clear_yield", "read_request", "request_path",
           "request_yield", "yield_requested"]
