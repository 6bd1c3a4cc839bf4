"""The factory control API on Ray Serve: ``serve run serve_apps.control:app_builder``.

Or in a Serve config::

    applications:
      - name: control
        route_prefix: /control
        import_path: serve_apps.control:app_builder
        args: {home: /path/to/factory/home}

The replica holds the cluster credential (the home's token); tenants reach it with their API keys. The
logic lives in ``aifactory.control``; this recipe only deploys it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from aifactory.config import StrictModel, parse_config


class ControlArgs(StrictModel):
    home: str | None = Field(default=None, description="Factory home (keys, audit, ledger); default $AIFACTORY_HOME.")
    address: str | None = Field(default=None, description="Ray cluster; default the home's `factory up` cluster.")
    num_replicas: int = Field(default=1, ge=1, le=16, description="Replicas of the control API.")
    num_cpus: float = Field(default=0.0, ge=0, description="Logical CPUs per replica. 0, like Serve's own controller and "
                            "proxies: it mostly waits on I/O, and any CPU it reserved would be taken from tenants' "
                            "work (a job declaring the whole cluster could never start).")
    tenant_apps: dict[str, Any] = Field(default_factory=dict, description="CompletionsArgs fields every tenant's "
                                        "app gets (sizes, caches): the operator's choice, not the tenant's.")
    rate_rps: float = Field(default=20.0, gt=0, description="Requests per second per API key (then 429).")
    rate_burst: int = Field(default=60, ge=1, description="Burst of requests per API key.")


def app_builder(args: ControlArgs | dict[str, Any] | None = None):
    from ray import serve

    cfg = args if isinstance(args, ControlArgs) else parse_config(ControlArgs, args or {}, source="control app args")

    @serve.deployment(name="ControlAPI", num_replicas=cfg.num_replicas,
                      ray_actor_options={"num_cpus": cfg.num_cpus}, max_ongoing_requests=32)
    @serve.ingress()
    class ControlAPI:
        def __init__(self, home: str | None, address: str | None, options: dict[str, Any] | None = None):
            self.home, self.address, self.options = home, address, options or {}

        def __serve_build_asgi_app__(self):
            # Built on the replica: the app holds a SQLite key store and the cluster token, never pickled.
            from aifactory.control.app import create_app
            from aifactory.home import FactoryHome

            return create_app(FactoryHome.from_env(self.home), address=self.address, **self.options)

    options = {"tenant_app_defaults": cfg.tenant_apps, "rate": (cfg.rate_rps, cfg.rate_burst)}
    return ControlAPI.bind(cfg.home, cfg.address, options)
