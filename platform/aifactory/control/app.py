"""The control API's FastAPI app: authentication, tenant scoping and error mapping; routes live beside it.

Rules every route follows:

- Authentication: ``Authorization: Bearer <API key>`` (:mod:`aifactory.security.apikeys`); anything else
  answers 401.
- The tenant comes from the key, never from the body: a tenant key acts only as its own tenant; an admin
  key acts for any tenant (and must name one to submit work).
- A tenant sees and acts only on its own jobs, costs, budgets, keys and audit entries. Anything of another
  tenant answers 404, exactly like something that does not exist, so that existence does not leak.
- Errors are JSON ``{"error": {"code", "message", "fields"}}``; a user's mistake is a 4xx naming the field;
  only the server's own faults are 5xx.
- Input is bounded before any route runs (:mod:`aifactory.control.guard`): names match strict patterns
  (400), bodies are at most 1 MiB (413) of JSON at most 32 deep without NUL or lone surrogates (400), and
  each API key has a request rate (429 with ``Retry-After``), as do failed authentications per address.
- Serve changes that collide with another change of the same application in progress answer 409
  (``conflict``), nothing of them applied (:mod:`aifactory.serve.deploy`'s one writer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from aifactory.exceptions import (
    AuthenticationError, BudgetExceeded, ClusterUnreachable, ConfigError, FactoryError, IntegrityError,
    JobNotFound, MeterUnavailable, NotFound, PermissionDenied, QueueRefused, QuotaExceeded,
)
from aifactory.home import FactoryHome
from aifactory.security.apikeys import KeyStore, Principal

log = logging.getLogger("aifactory.control")

API_VERSION = "v1"
_bearer = HTTPBearer(auto_error=False, description="A factory API key: `factory keys create --tenant T`.")


@dataclass
class ControlState:
    """What every request needs: the home (keys, audit, ledger), the cluster address, and a key store."""

    home: FactoryHome
    address: str | None = None
    rate: tuple[float, int] = (20.0, 60)  # requests/s and burst per API key
    auth_failure_rate: tuple[float, int] = (20.0, 200)  # failed authentications/s and burst per client address
    # The operator's sizing of tenants' apps (CompletionsArgs fields: interactive, batch, canary, cache, ...);
    # a tenant chooses the model, never the resources or the auth mode.
    tenant_app_defaults: dict[str, Any] = field(default_factory=dict)
    keys: KeyStore = field(init=False)

    def __post_init__(self) -> None:
        from aifactory.control.guard import KeyRateLimiter

        self.keys = KeyStore(self.home)
        self.limiter = KeyRateLimiter(*self.rate)
        self.auth_failures = KeyRateLimiter(*self.auth_failure_rate)

    def jobs(self, principal: Principal, tenant: str | None = None, project: str = "default"):
        """A jobs client acting for ``principal`` (and ``tenant`` when it submits), holding the cluster token."""
        from aifactory.jobs import Client

        # The client's default admission is the cost package's quota and budget check: it runs here,
        # server-side, where a tenant cannot skip it.
        return Client(address=self.address, tenant=tenant, project=project, home=self.home, actor=principal.actor)


def state_of(request: Request) -> ControlState:
    return request.app.state.control


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    state = state_of(request)
    client = request.client.host if request.client else "unknown"
    try:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
        principal = state.keys.authenticate(credentials.credentials)
    except AuthenticationError:
        # Guessing keys costs time: failed attempts are limited per client address.
        state.auth_failures.check(f"addr:{client}", f"address {client} (failed authentications)")
        raise
    state.limiter.check(principal.key_id, f"API key {principal.key_id}")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


def require_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise PermissionDenied("this needs an admin API key")
    return principal


AdminPrincipal = Annotated[Principal, Depends(require_admin)]


def scope_tenant(principal: Principal, requested: str | None) -> str | None:
    """The tenant a read is limited to: the key's own for tenants; the requested one (or all) for admins.

    A tenant asking for another tenant gets an empty view rather than an error, which reveals nothing.
    """
    if principal.is_admin:
        return requested
    return principal.tenant


def not_visible(kind: str, name: str) -> NotFound:
    """The error for something the caller may not see: the same words as for something that does not exist."""
    return NotFound(kind, name)


# ---- errors --------------------------------------------------------------------------------------------

_STATUS: list[tuple[type[FactoryError], int, str]] = [
    (AuthenticationError, 401, "unauthenticated"),
    (PermissionDenied, 403, "forbidden"),
    (JobNotFound, 404, "not_found"),
    (NotFound, 404, "not_found"),
    (ConfigError, 422, "invalid_request"),
    (QueueRefused, 422, "queue_refused"),
    (QuotaExceeded, 429, "quota_exceeded"),
    (MeterUnavailable, 503, "meter_unavailable"),
    (BudgetExceeded, 402, "budget_exceeded"),
    (ClusterUnreachable, 503, "cluster_unreachable"),
    (IntegrityError, 409, "integrity_error"),
]


def _error(status: int, code: str, message: str, fields: list[str] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "fields": fields or []}},
                        status_code=status, headers=headers)


def _factory_error(request: Request, err: FactoryError) -> JSONResponse:
    from aifactory.control.guard import InvalidInput, RateLimited
    from aifactory.serve.deploy import ChangeConflict

    if isinstance(err, InvalidInput):
        return _error(err.status, "payload_too_large" if err.status == 413 else "invalid_request", str(err),
                      [err.field])
    if isinstance(err, RateLimited):
        import math

        return _error(429, "rate_limited", str(err), headers={"Retry-After": str(max(1, math.ceil(err.retry_after_s)))})
    if isinstance(err, ChangeConflict):
        return _error(409, "conflict", str(err), ["app"])
    for cls, status, code in _STATUS:
        if isinstance(err, cls):
            break
    else:
        status, code = 400, "bad_request"
    if isinstance(err, (JobNotFound, NotFound)):
        # Never echo cluster addresses or hints that tell one tenant about another's work.
        what = getattr(err, "kind", "job")
        name = getattr(err, "job_id", None) or getattr(err, "name", "")
        return _error(404, code, f"no {what} {name!r}")
    fields = []
    if isinstance(err, ConfigError):
        fields = [p.split(":", 1)[0] for p in err.problems]
    if isinstance(err, QueueRefused):
        fields = [err.field]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _error(status, code, str(err), fields, headers)


def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems, fields = [], []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        fields.append(loc)
        msg = "unknown field (extra fields are not allowed)" if e.get("type") == "extra_forbidden" else e.get("msg")
        problems.append(f"{loc}: {msg}")
    return _error(422, "invalid_request", "; ".join(problems) or "invalid request", fields)


def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return _error(err.status_code, code, str(err.detail), headers=getattr(err, "headers", None))


def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("control API: unexpected error on %s %s", request.method, request.url.path)
    return _error(500, "internal", f"internal error ({type(err).__name__}); the operator's logs have details")


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": "ErrorBody", "description": "No, unknown or revoked API key."},
    404: {"model": "ErrorBody", "description": "Not found (or another tenant's)."},
    400: {"model": "ErrorBody", "description": "Invalid name, or a body nested too deep or carrying NUL or "
          "invalid Unicode; `fields` names the field."},
    413: {"model": "ErrorBody", "description": "Request body over the limit (1 MiB)."},
    422: {"model": "ErrorBody", "description": "Invalid request; `fields` names the fields at fault."},
    429: {"model": "ErrorBody", "description": "Over the API key's request rate; see `Retry-After`."},
}


def create_app(home: FactoryHome | None = None, *, address: str | None = None,
               rate: tuple[float, int] = (20.0, 60), max_body_bytes: int | None = None,
               tenant_app_defaults: dict[str, Any] | None = None) -> FastAPI:
    """The control API for ``home`` (default: ``AIFACTORY_HOME``) and the cluster at ``address``; ``rate``:
    requests/s and burst per API key; ``max_body_bytes``: the largest request body (default 1 MiB);
    ``tenant_app_defaults``: CompletionsArgs fields every tenant's app gets (sizes, caches)."""
    from aifactory.control.guard import MAX_BODY_BYTES, InputGuard

    from aifactory.control import routes_admin, routes_jobs, routes_registry, routes_serve
    from aifactory.control.schemas import ErrorBody

    app = FastAPI(
        title="aifactory control API",
        version=API_VERSION,
        description="Submit and manage work on the factory as a tenant. Authenticate with "
        "`Authorization: Bearer <API key>`. Another tenant's things answer 404.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.control = ControlState(home=home or FactoryHome.from_env(), address=address, rate=rate,
                                     tenant_app_defaults=dict(tenant_app_defaults or {}))
    from aifactory.registry.service import MAX_WEIGHTS_BYTES

    app.add_middleware(InputGuard, max_body_bytes=max_body_bytes or MAX_BODY_BYTES,
                       raw_bodies={"/v1/models/register": MAX_WEIGHTS_BYTES})
    app.add_exception_handler(FactoryError, _factory_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    responses = {k: {**v, "model": ErrorBody} for k, v in COMMON_RESPONSES.items()}
    for module in (routes_jobs, routes_admin, routes_serve, routes_registry):
        app.include_router(module.router, prefix=f"/{API_VERSION}", responses=responses)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def openapi_spec() -> dict[str, Any]:
    """The published OpenAPI spec (does not touch the home or the cluster beyond creating the key store)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return create_app(FactoryHome.from_env(tmp)).openapi()
