"""Identity, costs, budgets and quotas, the audit log and API keys through the control API.

Tenants read their own costs, budgets, audit entries and keys (and may rotate or revoke their own keys);
admins read everything and alone change budgets and quotas or issue keys. Changes are audited once each.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from aifactory import audit
from aifactory.control.app import AdminPrincipal, CurrentPrincipal, not_visible, scope_tenant, state_of
from aifactory.control.schemas import AuditRecord, IssuedKey, Key, KeyCreate, KeyRotate, WhoAmI
from aifactory.exceptions import ConfigError
from aifactory.security.apikeys import KeyInfo, Principal

router = APIRouter()

TenantQuery = Annotated[str | None, Query(max_length=63, description="Admins: only this tenant.")]
SinceQuery = Annotated[str | None, Query(max_length=64, description="Since WHEN: 2h, 7d, an ISO date or epoch s.")]


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return audit.parse_since(text)
    except ConfigError as err:
        raise ConfigError("query", [f"since: {err.problems[0].split(': ', 1)[-1]}"]) from None


@router.get("/whoami", response_model=WhoAmI, tags=["identity"], summary="Who your API key acts as")
def whoami(principal: CurrentPrincipal) -> WhoAmI:
    return WhoAmI(key_id=principal.key_id, tenant=principal.tenant, role=principal.role, name=principal.name)


# ---- audit ---------------------------------------------------------------------------------------------

@router.get("/audit", response_model=list[AuditRecord], tags=["audit"],
            summary="Audit entries of your tenant (admins: all, or ?tenant=)")
def audit_log(
    request: Request,
    principal: CurrentPrincipal,
    tenant: TenantQuery = None,
    since: SinceQuery = None,
    action: Annotated[str | None, Query(max_length=64, description="An action or group: job, key.rotate")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many (the newest).")] = 1000,
) -> list[AuditRecord]:
    scope = scope_tenant(principal, tenant)
    entries = audit.query(state_of(request).home, tenant=scope, since=_since(since), action=action, limit=limit)
    if not principal.is_admin:
        entries = [e for e in entries if e.tenant == principal.tenant]  # belt and braces: never another's
    return [AuditRecord(**e.model_dump(exclude={"prev_hash"})) for e in entries]


# ---- API keys ------------------------------------------------------------------------------------------

def _key(info: KeyInfo) -> Key:
    return Key(**info.to_dict())


def _visible_key(request: Request, principal: Principal, key_id: str) -> KeyInfo:
    from aifactory.exceptions import NotFound

    try:
        info = state_of(request).keys.get(key_id)
    except NotFound:
        raise not_visible("API key", key_id) from None
    if not principal.is_admin and info.tenant != principal.tenant:
        raise not_visible("API key", key_id)
    return info


@router.get("/keys", response_model=list[Key], tags=["keys"], summary="API keys of your tenant (admins: all)")
def list_keys(request: Request, principal: CurrentPrincipal, tenant: TenantQuery = None) -> list[Key]:
    scope = scope_tenant(principal, tenant)
    return [_key(k) for k in state_of(request).keys.list(scope)]


@router.post("/keys", response_model=IssuedKey, status_code=201, tags=["keys"], summary="Issue a key (admin)")
def create_key(body: KeyCreate, request: Request, principal: AdminPrincipal) -> IssuedKey:
    issued = state_of(request).keys.create(tenant=body.tenant, role=body.role, name=body.name,
                                           actor=principal.actor)
    return IssuedKey(**issued.info.to_dict(), key=issued.secret)


@router.post("/keys/{key_id}/rotate", response_model=IssuedKey, tags=["keys"],
             summary="Replace a key of your tenant (admins: any) and revoke the old one")
def rotate_key(key_id: str, body: KeyRotate, request: Request, principal: CurrentPrincipal) -> IssuedKey:
    _visible_key(request, principal, key_id)
    issued = state_of(request).keys.rotate(key_id, grace_s=body.grace_s, actor=principal.actor)
    return IssuedKey(**issued.info.to_dict(), key=issued.secret)


@router.delete("/keys/{key_id}", response_model=Key, tags=["keys"],
               summary="Revoke a key of your tenant (admins: any)")
def revoke_key(key_id: str, request: Request, principal: CurrentPrincipal) -> Key:
    _visible_key(request, principal, key_id)
    return _key(state_of(request).keys.revoke(key_id, actor=principal.actor))


# ---- costs, budgets and quotas (aifactory.cost) -------------------------------------------------------

try:
    from aifactory.cost.budgets import TenantLimits
    from aifactory.cost.kpis import GROUPINGS
except ImportError:  # pragma: no cover - a trimmed install without the cost package serves no cost routes
    TenantLimits = None

if TenantLimits is not None:
    CostGrouping = Literal[tuple(GROUPINGS)]  # type: ignore[valid-type]

    @router.get("/costs", tags=["costs"], summary="Cost of your tenant's work (admins: all, or ?tenant=)")
    def costs(
        request: Request,
        response: Response,
        principal: CurrentPrincipal,
        by: Annotated[CostGrouping, Query(description="Group rows by this.")] = "tenant",
        since: SinceQuery = None,
        tenant: TenantQuery = None,
        limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many rows (the costliest "
                                    "first when cut); `X-Total-Count` says how many there are.")] = 1000,
    ) -> list[dict]:
        from aifactory.cost.kpis import cost_rows
        from aifactory.cost.ledger import Ledger
        from aifactory.cost.schedule import load_prices

        home = state_of(request).home
        scope = scope_tenant(principal, tenant)
        records = Ledger.of(home).usage(since=_since(since), tenant=scope)
        rows = cost_rows(records, load_prices(home=home), by=by)
        if not principal.is_admin:
            rows = [r for r in rows if r.get("tenant") == principal.tenant]
        response.headers["X-Total-Count"] = str(len(rows))
        if len(rows) > limit:
            rows = sorted(rows, key=lambda r: -(r.get("cost_usd") or 0.0))[:limit]
        return rows

    @router.get("/budgets", tags=["costs"], summary="Budget state of your tenant (admins: all)")
    def budgets(request: Request, principal: CurrentPrincipal, tenant: TenantQuery = None) -> list[dict]:
        from aifactory.cost.budgets import budget_status

        scope = scope_tenant(principal, tenant)
        rows = budget_status(state_of(request).home)
        return [r for r in rows if scope is None or r["tenant"] == scope]

    @router.put("/budgets/{tenant}", tags=["costs"], summary="Set a tenant's budget and quota (admin)")
    def set_limits(tenant: str, body: TenantLimits, request: Request, principal: AdminPrincipal) -> dict:
        from aifactory.config import parse_config
        from aifactory.cost.budgets import load_budgets, save_budgets
        from aifactory.tenancy import TenantRef

        parse_config(TenantRef, {"tenant": tenant}, source="path")  # 422 naming `tenant` if invalid
        home = state_of(request).home
        cfg = load_budgets(home)
        before = cfg.tenants.get(tenant)
        tenants = dict(cfg.tenants)
        tenants[tenant] = body
        save_budgets(home, cfg.model_copy(update={"tenants": tenants}))
        # One audit entry per kind of limit that actually changed.
        for kind in ("budget", "quota"):
            old = getattr(before, kind) if before else None
            new = getattr(body, kind)
            if old != new:
                audit.record(home, actor=principal.actor, action=f"{kind}.set", target=tenant, tenant=tenant,
                             detail={"before": old.model_dump() if old else None,
                                     "after": new.model_dump() if new else None})
        return {"tenant": tenant, **body.model_dump(mode="json")}
