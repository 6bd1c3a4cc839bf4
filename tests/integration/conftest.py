"""One real local Ray cluster for the whole integration session, started with `factory up`.

``factory_cluster`` runs the real CLI (`factory up`) against a private factory home with free loopback
ports, and `factory down` at the end. ``ray_driver`` connects this pytest process to it as a driver for
tests that use Ray Data, Train, Serve or Tune directly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

FACTORY = [str(Path(sys.executable).parent / "factory")]
METER_INTERVAL_S, METER_WINDOW_S = 1.0, 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_factory(*args: str, home: str | None = None, check: bool = True, timeout: float = 180,
                env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ if env is None else env)
    if home:
        full_env["AIFACTORY_HOME"] = home
    proc = subprocess.run([*FACTORY, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"factory {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class FactoryCluster:
    home: str
    gcs_address: str
    dashboard_url: str
    metrics_port: int
    token_path: str

    def env(self) -> dict[str, str]:
        """Environment for a Ray client of this cluster (e.g. the real `ray job submit`)."""
        env = dict(os.environ)
        env.update(AIFACTORY_HOME=self.home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        return env


@pytest.fixture(scope="session")
def factory_cluster() -> FactoryCluster:
    home = os.environ["AIFACTORY_HOME"]
    ports = {"port": free_port(), "dashboard-port": free_port(), "metrics-port": free_port()}
    # The always-on meter with fine windows, so tests read committed usage seconds after their work ends.
    args = ["up", "--num-cpus", "6", "--object-store-memory", "768MiB", "--serve-ingress", "python",
            "--meter-interval-s", str(METER_INTERVAL_S), "--meter-window-s", str(METER_WINDOW_S), "--format", "json"]
    for k, v in ports.items():
        args += [f"--{k}", str(v)]
    out = json.loads(run_factory(*args, home=home).stdout)
    cluster = FactoryCluster(
        home=home,
        gcs_address=out["address"],
        dashboard_url=out["dashboard"],
        metrics_port=ports["metrics-port"],
        token_path=out["token"],
    )
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = cluster.token_path
    yield cluster
    run_factory("down", home=home, check=False)


@pytest.fixture(scope="session")
def ray_driver(factory_cluster):
    """This pytest process as a Ray driver of the session cluster."""
    import ray

    ray.init(address=factory_cluster.gcs_address, logging_level="WARNING", log_to_driver=False)
    yield factory_cluster
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_http_port(ray_driver) -> int:
    """Serve's HTTP port on 127.0.0.1. One Serve instance per session, since its http_options cannot change once
    it runs (a second serve.start with another port is silently ignored): modules share it and delete their own
    apps instead of shutting Serve down. Library code (the bench runner) may have started it already."""
    from ray import serve

    from aifactory.bench.runner import ensure_serve

    port = ensure_serve(log=lambda msg: None)
    yield port
    serve.shutdown()


@dataclass(frozen=True)
class ControlAPI:
    url: str
    home: str
    serve_port: int

    def key(self, tenant: str | None, name: str = "itest") -> str:
        """A fresh API key (admin when ``tenant`` is None) in the session home's real key store."""
        from aifactory.home import FactoryHome
        from aifactory.security.apikeys import KeyStore

        store = KeyStore(FactoryHome.from_env(self.home))
        if tenant is None:
            return store.create(tenant=None, role="admin", name=name).secret
        return store.create(tenant=tenant, name=name).secret


# Tenants' apps deployed through this control API are tiny: small CPU shares, one replica per class.
TINY_TENANT_APPS = {
    cls: {"num_cpus": 0.05, "autoscaling": {"min_replicas": 1, "max_replicas": 1, "slo_aware": False}}
    for cls in ("interactive", "batch", "canary")
}


@pytest.fixture(scope="session")
def control_api(ray_driver, serve_http_port) -> ControlAPI:
    """The control API on the session's Serve (one replica, tiny tenant apps), for the modules that probe it.
    Deployed once per session (a few seconds); removed at the end, Serve and other apps untouched."""
    import time

    import httpx
    from ray import serve

    from serve_apps.control import app_builder

    name, prefix = "itest-control", "/itest-control"
    # A high per-key rate: the probes here must reach the routes (the 429 path is unit-tested).
    serve.run(app_builder({"home": ray_driver.home, "tenant_apps": TINY_TENANT_APPS, "rate_rps": 1000,
                           "rate_burst": 1000}), name=name,
              route_prefix=prefix)
    url = f"http://127.0.0.1:{serve_http_port}{prefix}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield ControlAPI(url=url, home=ray_driver.home, serve_port=serve_http_port)
    serve.delete(name)
