"""The tenant of a request: the ``X-Tenant`` header, else the API key (``Authorization: Bearer``) mapped to one.

A request with neither is attributed to ``unattributed`` (counted, never dropped); an unknown API key or an
invalid tenant name is a 401/400 naming the header.
"""

from __future__ import annotations

from collections.abc import Mapping

from aifactory.serve.schemas import APIError
from aifactory.tenancy import _NAME_RE, _RESERVED, UNATTRIBUTED

TENANT_HEADER = "x-tenant"
SLO_HEADER = "x-slo-class"


def resolve_tenant(headers: Mapping[str, str], api_keys: Mapping[str, str]) -> str:
    """``headers`` must be case-insensitive (Starlette's are) or lower-cased."""
    explicit = (headers.get(TENANT_HEADER) or "").strip()
    if explicit:
        if not _NAME_RE.match(explicit) or explicit in _RESERVED:
            raise APIError(400, f"X-Tenant: {explicit!r} is not a valid tenant name (lowercase DNS label)",
                           param="X-Tenant", code="invalid_tenant")
        return explicit
    auth = (headers.get("authorization") or "").strip()
    if auth.lower().startswith("bearer "):
        key = auth[7:].strip()
        if key in api_keys:
            return api_keys[key]
        if api_keys:
            raise APIError(401, "Authorization: unknown API key; send a key mapped to a tenant or an X-Tenant header",
                           param="Authorization", code="invalid_api_key", type_="authentication_error")
    return UNATTRIBUTED


def resolve_slo_class(headers: Mapping[str, str], path: str, default: str) -> str:
    """``X-SLO-Class`` header, else the route (``/batch/v1/...``), else ``default``."""
    value = (headers.get(SLO_HEADER) or "").strip().lower()
    if not value:
        value = "batch" if path.startswith("/batch/") or "/batch/" in path else default
    if value not in ("interactive", "batch"):
        raise APIError(400, f"X-SLO-Class: {value!r} is not one of 'interactive', 'batch'",
                       param="X-SLO-Class", code="invalid_slo_class")
    return value
