"""The model registry through the control API: registration and signing as a service, and your models.

``POST /v1/models/register`` is how trained and optimized models enter the registry from anywhere but the
control plane's own process (:mod:`aifactory.registry.service`): the body is the weights file
(``application/octet-stream``, up to ``MAX_WEIGHTS_BYTES``), the ``X-Aifactory-Registration`` header the
rest (base64url JSON: name, model_config, manifest, servable). The caller authenticates with

- a job's registration grant (``aifr_...``, issued when the control API launched the job): the model is
  registered as the tenant that launched the job, and only while that job is not finished; or
- a factory API key: a tenant key registers as its own tenant; an admin key names the tenant.

Whatever tenant the manifest claims is overwritten. The version lands in that tenant's namespace and is
signed with the key only the control plane holds. ``GET /v1/models`` lists the caller's own versions;
``GET /v1/models/signing-key`` gives any key holder the public key every verifier needs (no secret in it).
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field

from aifactory import audit
from aifactory.config import StrictModel
from aifactory.control.app import CurrentPrincipal, _bearer, authenticate, scope_tenant, state_of
from aifactory.exceptions import AuthenticationError, ConfigError, JobNotFound, PermissionDenied
from aifactory.tenancy import TenantName

router = APIRouter(tags=["models"])

HEADER = "X-Aifactory-Registration"
MAX_HEADER_CHARS = 12_000
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class Registrant(BaseModel):
    """Who a registration registers as, and who the audit log names."""

    tenant: str
    actor: str
    via: str


def registrant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Registrant:
    from aifactory.registry.service import RegistrationGrants, is_grant_token

    state = state_of(request)
    token = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
    if not is_grant_token(token):
        principal = authenticate(request, credentials)  # API keys: the API's own checks and rate limits
        return Registrant(tenant=principal.tenant or "", actor=principal.actor, via="api-key")
    client = request.client.host if request.client else "unknown"
    try:
        grant = RegistrationGrants(state.home).authenticate(token)
        from aifactory.jobs import Client

        # The grant is good only while its job runs: its submission id, looked up on the cluster.
        try:
            job = Client(address=state.address, home=state.home, actor="control-plane").get(grant.submission_id)
        except JobNotFound:
            raise AuthenticationError(f"registration credential {grant.grant_id}: its job is unknown") from None
        if job.status in _TERMINAL or job.tenant != grant.tenant:
            raise AuthenticationError(f"registration credential {grant.grant_id}: its job {grant.submission_id} "
                                      f"is {job.status}")
    except AuthenticationError:
        state.auth_failures.check(f"addr:{client}", f"address {client} (failed authentications)")
        raise
    state.limiter.check(f"grant:{grant.grant_id}", f"registration credential {grant.grant_id}")
    return Registrant(tenant=grant.tenant, actor=grant.actor, via="grant")


class Registration(StrictModel):
    """What the ``X-Aifactory-Registration`` header carries (base64url of this as JSON); the body is the weights."""

    name: str = Field(min_length=1, max_length=128, description="Model name within your tenant's namespace.")
    model_config_: dict[str, Any] = Field(alias="model_config", description="The model's config (JSON).")
    manifest: dict[str, Any] = Field(description="Provenance and lineage; `tenant` is set by the control plane.")
    servable: bool = Field(default=True, description="Whether `newest` resolution may pick it (signed).")
    weights_suffix: str = Field(default=".pt", pattern=r"^\.(pt|safetensors)$", description="`.pt` or `.safetensors`.")
    tenant: TenantName | None = Field(default=None, description="Admin keys only: the tenant to register for.")

    model_config = {"populate_by_name": True, "extra": "forbid"}


def _registration(header: str | None) -> Registration:
    from aifactory.config import parse_config

    if not header:
        raise ConfigError("model registration", [f"{HEADER}: missing (base64url JSON: name, model_config, manifest)"])
    if len(header) > MAX_HEADER_CHARS:
        raise ConfigError("model registration", [f"{HEADER}: longer than {MAX_HEADER_CHARS} characters"])
    try:
        data = json.loads(base64.urlsafe_b64decode(header.encode() + b"=" * (-len(header) % 4)))
    except (ValueError, TypeError):
        raise ConfigError("model registration", [f"{HEADER}: not base64url-encoded JSON"]) from None
    if not isinstance(data, dict):
        raise ConfigError("model registration", [f"{HEADER}: not a JSON object"])
    return parse_config(Registration, data, source=HEADER)


def _out(mv) -> dict[str, Any]:
    return mv.to_dict()


_WEIGHTS_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
    "type": "string", "format": "binary",
    "description": f"The consolidated weights file; everything else in the {HEADER} header."}}}}}


@router.post("/models/register", status_code=201, summary="Register and sign a model version as your tenant",
             openapi_extra=_WEIGHTS_BODY)
async def register_model(
    request: Request,
    who: Annotated[Registrant, Depends(registrant)],
    x_aifactory_registration: Annotated[str | None, Header(
        description="base64url JSON: name, model_config, manifest, servable, weights_suffix, tenant (admins)")] = None,
) -> dict[str, Any]:
    import asyncio
    import tempfile

    from aifactory.registry.service import register_for

    body = _registration(x_aifactory_registration)
    if who.via == "api-key" and not who.tenant:  # an admin key
        if body.tenant is None:
            raise ConfigError("model registration", ["tenant: an admin key must name the tenant to register for"])
        tenant = body.tenant
    elif body.tenant is not None and body.tenant != who.tenant:
        raise PermissionDenied("tenant: you register only as your own tenant; omit `tenant`")
    else:
        tenant = who.tenant
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/octet-stream":
        raise ConfigError("model registration", ["body: send the weights as application/octet-stream"])
    weights = await request.body()  # bounded by the input guard (MAX_WEIGHTS_BYTES)
    if not weights:
        raise ConfigError("model registration", ["body: no weights"])
    home = state_of(request).home

    def register() -> Any:
        with tempfile.TemporaryDirectory(prefix="aif-register-") as tmp:
            path = f"{tmp}/weights{body.weights_suffix}"
            with open(path, "wb") as f:
                f.write(weights)
            mv = register_for(home, tenant, body.name, weights_path=path, model_config=body.model_config_,
                              manifest=body.manifest, servable=body.servable)
        audit.record(home, actor=who.actor, action="model.register", target=f"{tenant}/{mv.ref}", tenant=tenant,
                     detail={"sha256": mv.sha256, "servable": mv.servable, "via": who.via,
                             "claimed_tenant": body.manifest.get("tenant"), "run_id": mv.manifest.get("run_id")})
        return mv

    return _out(await asyncio.to_thread(register))  # copying, hashing, signing: off the event loop


@router.get("/models", summary="Your tenant's model versions (admins: all, or ?tenant=)")
def list_models(request: Request, principal: CurrentPrincipal, tenant: TenantName | None = None) -> list[dict]:
    from aifactory.registry import ModelRegistry

    scope = scope_tenant(principal, tenant)
    return [_out(mv) for mv in ModelRegistry(state_of(request).home, tenant=scope).list()]


@router.get("/models/signing-key", response_class=PlainTextResponse,
            summary="The control plane's public signing key (PEM), for verifiers")
def signing_key(request: Request, principal: CurrentPrincipal) -> str:
    from aifactory.security.signing import public_key_pem

    return public_key_pem(state_of(request).home).decode()
