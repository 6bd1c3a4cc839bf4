"""The tenant of a request.

Two modes (``auth`` in the app's args):

- ``header`` (local and behind a trusted gateway): the ``X-Tenant`` header, else an API key from the app's own
  ``api_keys`` map (``Authorization: Bearer``). A request with neither is attributed to ``unattributed``
  (counted, never dropped); an unknown API key or an invalid tenant name is a 401/400 naming the header.
- ``factory-keys`` (tenants reach Serve directly): every request must carry a factory API key
  (``factory keys create``), checked against the hashed key store under the factory home; the tenant is the key's,
  never the caller's word. No key or a bad key is 401; an ``X-Tenant`` naming another tenant is 403 (only admin
  keys may act for a tenant they name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from aifactory.serve.schemas import APIError
from aifactory.tenancy import _NAME_RE, _RESERVED, UNATTRIBUTED

TENANT_HEADER = "x-tenant"
SLO_HEADER = "x-slo-class"


def _named_tenant(headers: Mapping[str, str]) -> str:
    """The ``X-Tenant`` header, stripped ('' when absent)."""
    return (headers.get(TENANT_HEADER) or "").strip()


def _is_tenant_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in _RESERVED


def _bearer_key(headers: Mapping[str, str]) -> str | None:
    """The key of ``Authorization: Bearer <key>``; None when the header is absent or another scheme."""
    auth = (headers.get("authorization") or "").strip()
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def resolve_tenant(headers: Mapping[str, str], api_keys: Mapping[str, str]) -> str:
    """``headers`` must be case-insensitive (Starlette's are) or lower-cased."""
    explicit = _named_tenant(headers)
    if explicit:
        if not _is_tenant_name(explicit):
            raise APIError(400, f"X-Tenant: {explicit!r} is not a valid tenant name (lowercase DNS label)",
                           param="X-Tenant", code="invalid_tenant")
        return explicit
    key = _bearer_key(headers)
    if key is not None:
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


class TenantResolver:
    """Built once per replica from the app's args; call it with each request's headers."""

    def __init__(self, *, auth: Literal["header", "factory-keys"], api_keys: Mapping[str, str], home: str | None,
                 tenants: Sequence[str] | None = None):
        self.auth = auth
        self.api_keys = dict(api_keys)
        self.tenants = None if tenants is None else frozenset(tenants)
        self._keys = None
        if auth == "factory-keys":
            from aifactory.home import FactoryHome
            from aifactory.security.apikeys import KeyStore

            self._keys = KeyStore(FactoryHome.from_env(home))

    async def resolve(self, headers: Mapping[str, str]) -> str:
        """:meth:`__call__` for a request handler: the key store's SQLite lookup runs off the event loop, so a
        locked store (a key rotation in progress) never stalls the replica's other requests."""
        if self._keys is None:
            return self(headers)
        import asyncio

        return await asyncio.to_thread(self, headers)

    async def caller(self, headers: Mapping[str, str]) -> str:
        """The tenant of a read of the app's own state (``/v1/status``, ``/v1/models``): as :meth:`resolve`, but
        an anonymous caller (no key, and in header mode no ``X-Tenant`` either) is refused with 401."""
        tenant = await self.resolve(headers)
        if tenant == UNATTRIBUTED:
            raise APIError(401, "Authorization: this route needs an API key (or, on loopback, an X-Tenant header)",
                           param="Authorization", code="missing_api_key", type_="authentication_error")
        return tenant

    def __call__(self, headers: Mapping[str, str]) -> str:
        tenant = self._resolve(headers)
        if self.tenants is not None and tenant not in self.tenants:
            # A tenant's own app: another tenant's valid key is refused (not billed to, nor served for it).
            raise APIError(403, f"tenant {tenant!r} may not call this application", param="Authorization",
                           code="tenant_not_allowed", type_="permission_error")
        return tenant

    def _resolve(self, headers: Mapping[str, str]) -> str:
        if self._keys is None:
            return resolve_tenant(headers, self.api_keys)
        from aifactory.exceptions import AuthenticationError

        try:
            principal = self._keys.authenticate(_bearer_key(headers) or "")
        except AuthenticationError as err:
            raise APIError(401, f"Authorization: {err}", param="Authorization", code="invalid_api_key",
                           type_="authentication_error") from None
        named = _named_tenant(headers)
        if principal.is_admin:
            if not _is_tenant_name(named):
                raise APIError(400, "X-Tenant: an admin key must name the tenant it acts for",
                               param="X-Tenant", code="invalid_tenant")
            return named
        if named and named != principal.tenant:
            raise APIError(403, "X-Tenant: this API key does not belong to that tenant", param="X-Tenant",
                           code="tenant_mismatch", type_="permission_error")
        return principal.tenant
