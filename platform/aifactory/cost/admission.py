"""Admission: refuse work that would exceed a tenant's quota or that belongs to a tenant over its hard budget.

``admit(home, tenant, resources, workload)`` is called by ``aifactory.jobs.Client.submit`` and by the
CLIs that start work (`factory train`, `factory serve deploy`, `factory bench run`). Soft budget limits
admit the work but log a warning and record an alert (exported as a metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from aifactory.cost.budgets import load_budgets, period_start, spent_usd
from aifactory.exceptions import BudgetExceeded, QuotaExceeded
from aifactory.tenancy import TenantRef, WorkloadKind

log = logging.getLogger("aifactory.cost")

# Request keys as Ray spells them -> quota field.
_QUOTA_KEYS = {"CPU": "cpu", "cpu": "cpu", "GPU": "gpu", "gpu": "gpu"}


def admit(home, tenant: TenantRef, resources: Mapping[str, float], workload: WorkloadKind) -> None:
    """Raise QuotaExceeded / BudgetExceeded if ``tenant`` may not start work needing ``resources``."""
    cfg = load_budgets(home)
    limits = cfg.tenants.get(tenant.tenant)
    if limits is None:
        return
    from aifactory.cost.ledger import Ledger

    ledger = Ledger.of(home)
    if limits.quota is not None:
        in_use = None
        for key, amount in resources.items():
            field = _QUOTA_KEYS.get(key)
            limit = getattr(limits.quota, field) if field else None
            if limit is None or not amount:
                continue
            if in_use is None:
                in_use = ledger.live(tenant.tenant, max_age_s=cfg.live_max_age_s)
                if in_use is None:
                    log.warning("no fresh collector data for tenant %s: the quota check sees only this request",
                                tenant.tenant)
                    in_use = {}
            held = float(in_use.get(field, 0.0))
            if held + float(amount) > limit:
                raise QuotaExceeded(tenant.tenant, field.upper(), float(amount), float(limit), held)
    b = limits.budget
    if b is not None and (b.hard_usd is not None or b.soft_usd is not None):
        from aifactory.cost.pricebook import load_price_book

        spent = spent_usd(ledger, load_price_book(home=home), tenant.tenant, period_start(b.period, time.time()))
        if b.hard_usd is not None and spent >= b.hard_usd:
            raise BudgetExceeded(tenant.tenant, b.period, spent, b.hard_usd)
        if b.soft_usd is not None and spent >= b.soft_usd:
            msg = (f"tenant {tenant.tenant} is over its soft {b.period} budget: spent ${spent:.4f} of "
                   f"${b.soft_usd:.4f} soft / {b.hard_usd if b.hard_usd is not None else '-'} hard "
                   f"({WorkloadKind(workload).value} admitted)")
            log.warning(msg)
            ledger.add_alert(tenant.tenant, "budget_soft", msg)


def admission_check(home) -> Callable[[TenantRef, Mapping[str, float], WorkloadKind], None]:
    """``admit`` bound to ``home``, in the shape ``aifactory.jobs.Client(admission=[...])`` takes."""

    def check(tenant: TenantRef, resources: Mapping[str, float], workload: WorkloadKind) -> None:
        admit(home, tenant, resources, workload)

    return check
