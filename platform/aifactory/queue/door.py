"""The queue's door: :func:`enqueue` refuses at once what could never start, and queues the rest.

Refused at once, with one line naming the field and the limit (:class:`~aifactory.exceptions.QueueRefused`,
:class:`~aifactory.exceptions.QuotaExceeded`, :class:`~aifactory.exceptions.MeterUnavailable`,
:class:`~aifactory.exceptions.BudgetExceeded`), nothing queued and the refusal audited: an unknown lane, a
tenant the lane does not allow, a priority outside the lane's range, a name change control does not admit,
a request alone above a quota limit (the tenant's or the lane's), more than the whole cluster, a tenant
over its hard budget, and a tenant with a quota while the meter is not fresh. Work within the limits that
does not fit what is free now is queued; :func:`aifactory.queue.dispatcher.dispatch_once` starts it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aifactory import audit
from aifactory.exceptions import QueueRefused
from aifactory.queue.lanes import load_lanes
from aifactory.queue.policy import Ask, check_fits, check_request
from aifactory.queue.store import QueueEntry, QueueStore
from aifactory.workloads.launch import new_record_id
from aifactory.workloads.spec import Workload

REFUSALS = (*audit.DENIALS, QueueRefused)


def enqueue(home, workload: Workload, *, payload: Mapping[str, Any], actor: str, priority: int | None = None,
            capacity: Mapping[str, float] | None = None, entry_id: str | None = None,
            expected_runtime_s: float | None = None) -> QueueEntry:
    """Queue ``workload`` (``payload``: how the dispatcher starts it) or raise the refusal. ``capacity``:
    the cluster's total resources, when known, for the "larger than the cluster" refusal."""
    from aifactory.cost.admission import admit

    lanes = load_lanes(home)
    lane_name = lanes.lane_of(workload.tenant.tenant, workload.lane)
    if lane_name != workload.lane:
        workload = workload.model_copy(update={"lane": lane_name})
    lane = lanes.lanes.get(lane_name)
    prio = priority if priority is not None else (lane.default_priority if lane else 0)
    entry_id = entry_id or new_record_id("job" if workload.kind.value == "other" else workload.kind.value)
    resources = {k: float(v) for k, v in workload.resources.as_ray().items() if v}
    ask = Ask(id=entry_id, tenant=workload.tenant.tenant, lane=lane_name, priority=prio, resources=resources,
              enqueued_at=time.time(), name=workload.name, kind=workload.kind.value, pool=workload.pool)
    try:
        # The lane's rules, then the tenant's own quota and budget (the refusal a tenant can act on), then the
        # cluster's size.
        check_request(ask, lanes=lanes, capacity=None)
        admit(home, workload.tenant, workload.resources.as_ray(), workload.kind, pool=workload.pool, lane=lane_name,
              held=False)
        check_fits(ask, lane=lane, capacity=capacity)
    except REFUSALS as err:
        audit.denied(home, actor=actor, action=f"{workload.kind.value}.launch", target=workload.name,
                     reason=str(err), tenant=workload.tenant.tenant,
                     detail={"lane": lane_name, "priority": prio, "resources": resources})
        raise
    entry = QueueEntry(id=entry_id, tenant=workload.tenant.tenant, project=workload.tenant.project, lane=lane_name,
                       priority=prio, kind=workload.kind.value, name=workload.name, resources=resources,
                       pool=workload.pool, payload={**payload, "workload": workload.model_dump(mode="json")},
                       actor=actor, enqueued_at=ask.enqueued_at, reason="queued: not yet considered",
                       expected_runtime_s=expected_runtime_s)
    return QueueStore.of(home).add(entry)


def resolve_lane(home, tenant: str, lane: str | None) -> str:
    """The lane work of ``tenant`` goes to (the one named, else the tenant's default, else ``factory``); raises
    :class:`QueueRefused` for an unknown lane or one the tenant may not use. For the doors that launch without
    queueing (``factory train``, ``factory bench run``), so that their ``--lane`` is checked the same way."""
    lanes = load_lanes(home)
    name = lanes.lane_of(tenant, lane)
    found = lanes.lanes.get(name)
    if found is None:
        raise QueueRefused("lane", name, f"one of {sorted(lanes.lanes)}", "name a configured lane (lanes.yaml)")
    if found.allowed_tenants is not None and tenant not in found.allowed_tenants:
        raise QueueRefused(f"lanes.{name}.allowed_tenants", tenant, sorted(found.allowed_tenants),
                           f"tenant {tenant!r} may not use lane {name!r}; pick another --lane")
    return name


def cancel(home, entry_id: str, *, actor: str) -> QueueEntry:
    """Cancel a queued entry (``queued -> cancelled``); raises when it is no longer queued (stop the job)."""
    from aifactory.exceptions import FactoryError

    store = QueueStore.of(home)
    entry = store.get(entry_id)
    done = store.transition(entry_id, ("queued",), "cancelled", finished_at=time.time(),
                            reason=f"cancelled by {actor}")
    if done is None:
        raise FactoryError(f"queue entry {entry_id} is {store.get(entry_id).state}, not queued: "
                           f"stop its job instead (`factory stop {entry_id}`)")
    audit.record(home, actor=actor, action="queue.cancel", target=entry_id, tenant=entry.tenant,
                 detail={"lane": entry.lane})
    return done


__all__ = ["REFUSALS", "cancel", "enqueue", "resolve_lane"]
