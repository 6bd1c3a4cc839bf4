"""``ControlClient``: the factory control API over HTTP, with the job methods of ``aifactory.jobs.Client``.

The CLI and SDK use it when ``AIFACTORY_API_URL`` and ``AIFACTORY_API_KEY`` are set (:func:`from_env`);
without them they talk to a local cluster directly, as a single operator. Errors come back as the same
FactoryError subclasses the library raises (401 -> AuthenticationError, 404 -> JobNotFound/NotFound, ...).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from typing import Any

from aifactory.exceptions import (
    AuthenticationError, ClusterUnreachable, ConfigError, FactoryError, IntegrityError, JobNotFound, NotFound,
    PermissionDenied,
)
from aifactory.jobs.client import TERMINAL, JobRecord
from aifactory.tenancy import SLOClass, WorkloadKind

ENV_URL = "AIFACTORY_API_URL"
ENV_KEY = "AIFACTORY_API_KEY"


def configured() -> bool:
    """Whether the environment points the CLI/SDK at a control API."""
    return bool(os.environ.get(ENV_URL))


class _RemoteRefusal(FactoryError):
    """The control API refused a request; carries its status and error code."""

    def __init__(self, status: int, code: str, message: str):
        self.status, self.code = status, code
        super().__init__(message)

    def __reduce__(self):
        return (self.__class__, (self.status, self.code, str(self)))


class ControlClient:
    """Jobs (and a few other calls) through the control API, as the tenant of ``api_key``."""

    def __init__(self, url: str, api_key: str, *, tenant: str | None = None, project: str = "default",
                 timeout_s: float = 60.0):
        """``tenant``/``project``: what submissions name by default (a tenant key may name only its own)."""
        import httpx

        if not api_key:
            raise AuthenticationError(f"no API key: set {ENV_KEY} (an admin issues one with `factory keys create`)")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {api_key}"})
        self.address = self.url  # what error messages and `factory jobs` print as "where"
        self.tenant, self.project = tenant, project

    @classmethod
    def from_env(cls, *, tenant: str | None = None, project: str = "default") -> ControlClient:
        url = os.environ.get(ENV_URL)
        if not url:
            raise ConfigError("environment", [f"{ENV_URL}: not set (the control API's URL)"])
        return cls(url, os.environ.get(ENV_KEY, ""), tenant=tenant, project=project)

    def close(self) -> None:
        self._http.close()

    # ---- HTTP --------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
              not_found: FactoryError | None = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as err:
            raise ClusterUnreachable(self.url, f"control API: {err}") from None
        if resp.status_code < 400:
            return resp.json()
        try:
            err = resp.json()["error"]
            code, message = err.get("code", ""), err.get("message", resp.text)
        except (ValueError, KeyError, TypeError, AttributeError):
            code, message = "", resp.text[:500]
        status = resp.status_code
        if status == 401:
            raise AuthenticationError(message)
        if status == 403:
            raise PermissionDenied(message)
        if status == 404:
            raise not_found or NotFound("resource", path, message)
        if status == 422:
            raise ConfigError(f"control API request {method} {path}", [message])
        if status == 409:
            raise IntegrityError(path, "a verified artifact", message)
        if status == 503:
            raise ClusterUnreachable(self.url, message)
        if code in ("quota_exceeded", "budget_exceeded"):
            raise _RemoteRefusal(status, code, message)
        raise _RemoteRefusal(status, code or "error", f"control API {method} {path} -> HTTP {status}: {message}")

    # ---- jobs (the methods of aifactory.jobs.Client) ------------------------------------------------
    def submit(self, entrypoint: str | Sequence[str], *, workload: WorkloadKind = WorkloadKind.OTHER,
               slo_class: SLOClass | None = None, working_dir: str | None = None, runtime_env: Any = None,
               num_cpus: float | None = None, num_gpus: float | None = None, memory_bytes: int | None = None,
               entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
               lane: str | None = None, project: str | None = None, tenant: str | None = None,
               priority: int | None = None, **unsupported: Any) -> str:
        """Submit as the key's tenant; returns the submission id."""
        if working_dir or runtime_env or slo_class or any(v is not None for v in unsupported.values()):
            given = [k for k, v in {"working_dir": working_dir, "runtime_env": runtime_env, "slo_class": slo_class,
                                    **unsupported}.items() if v]
            raise ConfigError("submission through the control API",
                              [f"{k}: not supported through the control API" for k in given])
        if not isinstance(entrypoint, str):
            entrypoint = shlex.join(entrypoint)
        body: dict[str, Any] = {"entrypoint": entrypoint, "project": project or self.project,
                                "workload": WorkloadKind(workload).value}
        for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("memory_bytes", memory_bytes),
                     ("entrypoint_num_cpus", entrypoint_num_cpus), ("entrypoint_num_gpus", entrypoint_num_gpus),
                     ("lane", lane), ("priority", priority),
                     ("tenant", tenant or self.tenant)):
            if v is not None:
                body[k] = v
        return self._call("POST", "/v1/jobs", json=body)["id"]

    def list(self, tenant: str | None = None) -> list[JobRecord]:
        params = {"tenant": tenant} if tenant else None
        return [JobRecord(**j) for j in self._call("GET", "/v1/jobs", params=params)]

    def get(self, job_id: str) -> JobRecord:
        return JobRecord(**self._call("GET", f"/v1/jobs/{job_id}", not_found=JobNotFound(job_id, self.url)))

    def logs(self, job_id: str) -> str:
        return self._call("GET", f"/v1/jobs/{job_id}/logs", not_found=JobNotFound(job_id, self.url))["logs"]

    def stop(self, job_id: str) -> bool:
        return bool(self._call("POST", f"/v1/jobs/{job_id}/stop", not_found=JobNotFound(job_id, self.url))["stopped"])

    async def tail(self, job_id: str, *, poll_s: float = 1.0):
        """Yield new log text until the job ends (polling: the API serves whole logs)."""
        import asyncio

        seen = 0
        while True:
            record = self.get(job_id)
            text = self.logs(job_id)
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if record.status in TERMINAL:
                return
            await asyncio.sleep(poll_s)

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobRecord:
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.get(job_id)
            if record.status in TERMINAL:
                return record
            if time.monotonic() > deadline:
                raise FactoryError(f"job {job_id} did not finish within {timeout_s:.0f} s (status {record.status})")
            time.sleep(poll_s)

    # ---- beyond jobs ---------------------------------------------------------------------------------
    def whoami(self) -> dict:
        return self._call("GET", "/v1/whoami")

    def costs(self, *, by: str = "tenant", since: str | None = None, tenant: str | None = None) -> list[dict]:
        params = {"by": by, **{k: v for k, v in (("since", since), ("tenant", tenant)) if v}}
        return self._call("GET", "/v1/costs", params=params)

    def audit(self, *, since: str | None = None, action: str | None = None, tenant: str | None = None) -> list[dict]:
        params = {k: v for k, v in (("since", since), ("action", action), ("tenant", tenant)) if v}
        return self._call("GET", "/v1/audit", params=params or None)


    # ---- serving -------------------------------------------------------------------------------------
    def serve_apps(self) -> list[dict]:
        return self._call("GET", "/v1/serve/apps")

    def serve_deploy(self, name: str, model_name: str, model_version: str | None = None, *,
                     tenant: str | None = None) -> dict:
        """Deploy a completions app ``<tenant>.<name>`` at ``/t/<tenant>/<name>`` (answers only the tenant's keys)."""
        body = {"name": name, "model_name": model_name, "model_version": model_version}
        if tenant:
            body["tenant"] = tenant
        return self._call("POST", "/v1/serve/apps", json=body)

    def serve_canary(self, app: str, model_version: str, percent: float) -> dict:
        return self._call("POST", f"/v1/serve/apps/{app}/canary", json={"model_version": model_version,
                                                                         "percent": percent})

    def serve_promote(self, app: str) -> dict:
        return self._call("POST", f"/v1/serve/apps/{app}/promote")

    def serve_rollback(self, app: str) -> dict:
        return self._call("POST", f"/v1/serve/apps/{app}/rollback")

    def serve_delete(self, app: str) -> dict:
        return self._call("DELETE", f"/v1/serve/apps/{app}")

    def cache_info(self, app: str, *, tenant: str | None = None) -> dict:
        return self._call("GET", f"/v1/serve/apps/{app}/cache", params={"tenant": tenant} if tenant else None)

    def flush_cache(self, app: str, *, tenant: str | None = None) -> dict:
        return self._call("DELETE", f"/v1/serve/apps/{app}/cache", params={"tenant": tenant} if tenant else None)

    def budgets(self, *, tenant: str | None = None) -> list[dict]:
        return self._call("GET", "/v1/budgets", params={"tenant": tenant} if tenant else None)
