"""Per-tenant budgets (period, soft and hard USD limits) and quotas (concurrent CPUs/GPUs).

Configured in ``<home>/budgets.yaml``::

    tenants:
      search:
        budget: {period: month, soft_usd: 80, hard_usd: 100}
        quota: {cpu: 8, gpu: 2, pools: {gpu-h200: {gpu: 1}}}   # pools: limits within one node pool

A tenant without an entry has no limits. Spending is read from the ledger and priced with the price
book; concurrent holdings come from the collector's live table.

Every number must be finite (``.inf``, ``1e400`` or ``nan`` is refused with an error naming the field), and
the file is replaced atomically, so that it always reads back.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, FiniteFloat, model_validator

from aifactory.config import StrictModel, parse_config, read_yaml
from aifactory.cost.pricebook import PriceBook
from aifactory.cost.records import POOL_NAME, POOL_NAME_RULE
from aifactory.cost.pricing import price
from aifactory.tenancy import TenantName

Period = Literal["day", "week", "month"]


class Budget(StrictModel):
    period: Period = Field(default="month", description="Budget period, in UTC: day, week (Monday) or month.")
    soft_usd: FiniteFloat | None = Field(default=None, ge=0, description="Alert (log line + metric) above this spend.")
    hard_usd: FiniteFloat | None = Field(default=None, ge=0, description="Refuse new work at or above this spend.")

    @model_validator(mode="after")
    def _order(self) -> Budget:
        if self.soft_usd is not None and self.hard_usd is not None and self.soft_usd > self.hard_usd:
            raise ValueError(f"soft_usd ({self.soft_usd}) must not exceed hard_usd ({self.hard_usd})")
        return self


class PoolQuota(StrictModel):
    cpu: FiniteFloat | None = Field(default=None, ge=0,
                                    description="Most CPUs the tenant may hold at once in this pool.")
    gpu: FiniteFloat | None = Field(default=None, ge=0,
                                    description="Most GPUs the tenant may hold at once in this pool.")


class Quota(StrictModel):
    cpu: FiniteFloat | None = Field(default=None, ge=0, description="Most CPUs the tenant may hold at once, all pools.")
    gpu: FiniteFloat | None = Field(default=None, ge=0, description="Most GPUs the tenant may hold at once, all pools.")
    pools: dict[str, PoolQuota] = Field(
        default_factory=dict,
        description="Node pool (aifactory.io/pool label) -> limits within that pool, beside the all-pools ones.",
    )

    @model_validator(mode="after")
    def _pool_names(self) -> Quota:
        bad = [name for name in self.pools if not POOL_NAME.match(name)]
        if bad:
            raise ValueError(f"pools: {', '.join(map(repr, bad))} is not a pool name ({POOL_NAME_RULE})")
        return self


class TenantLimits(StrictModel):
    budget: Budget | None = Field(default=None, description="Spending limits per period.")
    quota: Quota | None = Field(default=None, description="Concurrent resource limits.")


class BudgetsConfig(StrictModel):
    tenants: dict[TenantName, TenantLimits] = Field(default_factory=dict, description="Limits by tenant.")
    live_max_age_s: FiniteFloat = Field(
        default=120.0, gt=0, description="Holdings older than this are stale: quotas then check the request alone."
    )


def budgets_path(home) -> str:
    return str(home.root / "budgets.yaml")


def load_budgets(home) -> BudgetsConfig:
    path = Path(budgets_path(home))
    if not path.is_file():
        return BudgetsConfig()
    return parse_config(BudgetsConfig, read_yaml(path), source=str(path))


def save_budgets(home, config: BudgetsConfig) -> None:
    """Replace ``budgets.yaml`` atomically (temp file + rename): a reader sees the old file or the new one,
    never half of one, and a crash mid-write leaves the old one."""
    import yaml

    path = Path(budgets_path(home))
    data = config.model_dump(mode="json", exclude_none=True)
    parse_config(BudgetsConfig, data, source=str(path))  # write only what load_budgets will read back
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".budgets.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(data, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def period_start(period: Period, now: float) -> float:
    d = _dt.datetime.fromtimestamp(now, tz=_dt.timezone.utc)
    day = d.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start = day
    elif period == "week":
        start = day - _dt.timedelta(days=day.weekday())
    else:
        start = day.replace(day=1)
    return start.timestamp()


def spent_usd(ledger, book: PriceBook, tenant: str, since: float) -> float:
    """USD the tenant spent in windows ending after ``since`` (a window straddling ``since`` counts pro rata)."""
    total = 0.0
    for r in ledger.usage(since=since, tenant=tenant):
        usd = price(r, book).usd
        if r.window_start < since:
            usd *= (r.window_end - since) / (r.window_end - r.window_start)
        total += usd
    return total


def budget_status(home, *, ledger=None, book: PriceBook | None = None, now: float | None = None) -> list[dict]:
    """One row per tenant with a budget: period, spent, soft and hard limits, remaining."""
    from aifactory.cost.ledger import Ledger
    from aifactory.cost.schedule import load_prices

    cfg = load_budgets(home)
    ledger = ledger or Ledger.of(home)
    book = book or load_prices(home=home)
    now = time.time() if now is None else now
    rows = []
    for tenant, limits in sorted(cfg.tenants.items()):
        b = limits.budget
        if b is None:
            continue
        spent = spent_usd(ledger, book, tenant, period_start(b.period, now))
        limit = b.hard_usd if b.hard_usd is not None else b.soft_usd
        rows.append({
            "tenant": tenant, "period": b.period, "spent_usd": round(spent, 6),
            "soft_usd": b.soft_usd, "hard_usd": b.hard_usd,
            "remaining_usd": None if limit is None else round(limit - spent, 6),
            "state": ("over-hard" if b.hard_usd is not None and spent >= b.hard_usd
                      else "over-soft" if b.soft_usd is not None and spent >= b.soft_usd else "ok"),
        })
    return rows
