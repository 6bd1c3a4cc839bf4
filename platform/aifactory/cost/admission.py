"""Admission: refuse work that would exceed a tenant's quota or that belongs to a tenant over its hard budget.

``admit(home, tenant, resources, workload)`` is called by the one launch path,
:func:`aifactory.workloads.launch`, and by nothing else. Quotas are checked against the tenant's live
holdings from the always-on meter, and fail closed: when a tenant has a quota on a resource it asks for
and the meter has no fresh sample, the work is refused (:class:`MeterUnavailable`) instead of being let
through on the request alone. A request larger than the limit by itself is refused with
:class:`QuotaExceeded` whatever the meter says. Soft budget limits admit the work but log a warning and
record an alert (exported as a metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from aifactory.cost.budgets import load_budgets, period_start, spent_usd
from aifactory.exceptions import BudgetExceeded, MeterUnavailable, QuotaExceeded
from aifactory.tenancy import TenantRef, WorkloadKind

log = logging.getLogger("aifactory.cost")

# Request keys as Ray spells them -> quota field.
_QUOTA_KEYS = {"CPU": "cpu", "cpu": "cpu", "GPU": "gpu", "gpu": "gpu"}


def admit(home, tenant: TenantRef, resources: Mapping[str, float], workload: WorkloadKind, *,
          pool: str | None = None, lane: str | None = None, held: bool = True) -> None:
    """Raise QuotaExceeded / MeterUnavailable / BudgetExceeded if ``tenant`` may not start work needing
    ``resources`` (everything the work will hold at once, in Ray's resource names).

    ``pool``: the node pool the work will run in, if the caller knows it. Work that names no pool may be
    placed in any pool, so it must fit every pool's quota of the tenant as well as the all-pools one.
    ``lane``: named in the refusal, so that the one line says where the work was headed.
    ``held=False``: the queue's door (:mod:`aifactory.queue`): the request alone against the limits, the meter's
    freshness and the budget, but not the holdings: work that fits the limit waits in the queue for them.
    """
    cfg = load_budgets(home)
    limits = cfg.tenants.get(tenant.tenant)
    if limits is None:
        return
    from aifactory.cost.ledger import Ledger

    ledger = Ledger.of(home)
    if limits.quota is not None:
        q = limits.quota
        scopes = [(None, q)]  # (pool or None for all pools, its limits)
        scopes += [(p, pq) for p, pq in sorted(q.pools.items()) if pool is None or p == pool]
        for scope, scope_limits in scopes:  # the request alone over a limit: refused, meter or not
            check_quota(tenant.tenant, resources, scope_limits, pool=scope, lane=lane, in_use=lambda _r: {})

        def in_use(scope: str | None, resource: str) -> Mapping[str, float]:
            held = ledger.live(tenant.tenant, max_age_s=cfg.live_max_age_s, pool=scope)
            if held is None:
                last = ledger.last_sample_at()
                raise MeterUnavailable(tenant.tenant, resource, None if last is None else time.time() - last,
                                       cfg.live_max_age_s)
            return held

        for scope, scope_limits in scopes:
            check_quota(tenant.tenant, resources, scope_limits, pool=scope, lane=lane,
                        in_use=(lambda resource, scope=scope: in_use(scope, resource)) if held else
                        (lambda resource, scope=scope: in_use(scope, resource) and {}))
    b = limits.budget
    if b is not None and (b.hard_usd is not None or b.soft_usd is not None):
        from aifactory.cost.schedule import load_prices

        spent = spent_usd(ledger, load_prices(home=home), tenant.tenant, period_start(b.period, time.time()))
        if b.hard_usd is not None and spent >= b.hard_usd:
            raise BudgetExceeded(tenant.tenant, b.period, spent, b.hard_usd)
        if b.soft_usd is not None and spent >= b.soft_usd:
            msg = (f"tenant {tenant.tenant} is over its soft {b.period} budget: spent ${spent:.4f} of "
                   f"${b.soft_usd:.4f} soft / {b.hard_usd if b.hard_usd is not None else '-'} hard "
                   f"({WorkloadKind(workload).value} admitted)")
            log.warning(msg)
            ledger.add_alert(tenant.tenant, "budget_soft", msg)


def check_quota(tenant: str, resources: Mapping[str, float], limits, *, pool: str | None,
                in_use: Callable[..., Mapping[str, float]], lane: str | None = None) -> None:
    """Raise QuotaExceeded if held + requested exceeds a limit of ``limits`` (a Quota or PoolQuota).

    ``in_use(resource)`` gives the tenant's current holdings by quota field in that scope; it is read only
    when a requested resource has a limit (and may raise, e.g. when the meter is not fresh).
    """
    held_by: Mapping[str, float] | None = None
    for key, amount in resources.items():
        field = _QUOTA_KEYS.get(key)
        limit = getattr(limits, field) if field else None
        if limit is None or not amount:
            continue
        if held_by is None:
            held_by = in_use(field.upper())
        held = float(held_by.get(field, 0.0))
        if held + float(amount) > limit:
            raise QuotaExceeded(tenant, field.upper(), float(amount), float(limit), held, pool=pool, lane=lane)
