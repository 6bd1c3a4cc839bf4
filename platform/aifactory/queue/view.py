"""What ``factory queue`` and ``GET /v1/queue`` show: each entry's place, priority, its tenant's fair share,
why it waits and about when it starts, with the last pass's figures from the store."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from aifactory.queue.store import QueueStore, queue_path

ACTIVE_STATES = ("queued", "dispatching", "running", "preempting")


class QueueRow(BaseModel):
    id: str = Field(description="The entry's id (the job id `factory jobs` shows).")
    tenant: str = Field(description="Whose work it is.")
    lane: str = Field(description="The lane it queues in.")
    priority: int = Field(description="Its priority within the lane.")
    state: str = Field(description="queued, dispatching, running, preempting, succeeded, failed, stopped, cancelled.")
    position: int | None = Field(default=None, description="Its place in the queue (1: next), while queued.")
    share: float | None = Field(default=None, description="Its tenant's fair share (decayed usage + held) / weight.")
    reason: str | None = Field(default=None, description="Why it waits, or how it ended.")
    eta_s: float | None = Field(default=None, description="Estimated seconds until it starts (None: unknown).")
    wait_s: float = Field(description="Seconds it has waited in the queue, all attempts.")
    attempts: int = Field(description="Starts so far.")
    preemptions: list[dict] = Field(default_factory=list, description="Each time it was asked to yield.")
    resources: dict[str, float] = Field(default_factory=dict, description="What it holds once running.")
    name: str = Field(description="The workload's name (entrypoint, recipe, spec).")


def queue_rows(home, *, tenant: str | None = None, lane: str | None = None, finished_within_s: float = 600.0,
               now: float | None = None) -> list[QueueRow]:
    """Active entries (queued by position first, then running) and those that ended in the last
    ``finished_within_s``."""
    if not queue_path(home).is_file():
        return []
    now = time.time() if now is None else now
    rows = []
    for e in QueueStore.of(home).list(tenant=tenant, lane=lane, since=now - finished_within_s):
        waiting = e.state in ("queued", "dispatching")
        since = float(e.payload.get("requeued_at") or e.enqueued_at)
        wait = e.queue_wait_s + (max(0.0, now - since) if waiting else 0.0)
        rows.append(QueueRow(id=e.id, tenant=e.tenant, lane=e.lane, priority=e.priority, state=e.state,
                             position=e.position if waiting else None, share=e.share, reason=e.reason,
                             eta_s=e.eta_s if waiting else None, wait_s=round(wait, 2), attempts=e.attempts,
                             preemptions=e.preemptions, resources=e.resources, name=e.name))
    order = {s: i for i, s in enumerate(("queued", "dispatching", "preempting", "running"))}
    return sorted(rows, key=lambda r: (order.get(r.state, 9), r.position or 10**9, r.id))


__all__ = ["ACTIVE_STATES", "QueueRow", "queue_rows"]
