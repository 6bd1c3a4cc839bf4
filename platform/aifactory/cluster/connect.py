"""Finding and connecting to a Ray cluster, with Ray's token authentication and on loopback.

Ray 2.60 turns token authentication on for new local clusters. The factory keeps the cluster's token in
``<home>/cluster/auth_token`` (mode 0600) and points every Ray client at it through ``RAY_AUTH_MODE=token``
and ``RAY_AUTH_TOKEN_PATH``. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps a local node on 127.0.0.1
(see ../shared/RAY-2.60-NOTES.md, "Keep Ray on loopback").
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.home import FactoryHome

DEFAULT_DASHBOARD_PORT = 8265
LOOPBACK = "127.0.0.1"


def token_path(home: FactoryHome) -> Path:
    return home.cluster_dir / "auth_token"


def ensure_token(home: FactoryHome) -> Path:
    """Create the cluster token (0600) under the factory home if it does not exist yet."""
    path = token_path(home)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def ray_env(home: FactoryHome, *, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for any Ray process the factory starts or any client it runs.

    An explicit ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` in ``base`` wins over the home's token.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tok = token_path(home)
    if "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_TOKEN_PATH" not in env and tok.exists():
        env["RAY_AUTH_TOKEN_PATH"] = str(tok)
    if "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env:
        env.setdefault("RAY_AUTH_MODE", "token")
    return env


def apply_ray_env(home: FactoryHome) -> None:
    """Set :func:`ray_env` in this process (entrypoints only; the library never calls it on import).

    Ray reads its loopback switch and caches its auth mode and token when it is first imported, so a driver
    that imported Ray before this call would start its node off loopback or be refused by its own cluster
    (InvalidAuthToken): :mod:`aifactory.ray_compat` makes that Ray re-read both.
    """
    from aifactory import ray_compat

    env = ray_env(home)
    changed = any(os.environ.get(k) != env.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"))
    os.environ.update(env)
    if env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        ray_compat.keep_imported_ray_on_loopback()
    if changed:
        ray_compat.refresh_auth_cache()


def auth_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    token = env.get("RAY_AUTH_TOKEN")
    if not token and env.get("RAY_AUTH_TOKEN_PATH") and Path(env["RAY_AUTH_TOKEN_PATH"]).exists():
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class ClusterAddress:
    """Where a cluster answers: its GCS (for drivers) and its dashboard (jobs, state API, REST)."""

    gcs: str | None
    dashboard_url: str

    @classmethod
    def parse(cls, address: str) -> ClusterAddress:
        """Accepts ``http://host:8265`` (dashboard), ``host:6379`` (GCS) or ``ray://host:10001``."""
        address = address.strip()
        if address.startswith(("http://", "https://")):
            return cls(gcs=None, dashboard_url=address.rstrip("/"))
        if address.startswith("ray://"):
            host = address.removeprefix("ray://").split(":")[0]
            return cls(gcs=address, dashboard_url=f"http://{host}:{DEFAULT_DASHBOARD_PORT}")
        host = address.split(":")[0] or LOOPBACK
        return cls(gcs=address, dashboard_url=f"http://{host}:{DEFAULT_DASHBOARD_PORT}")


def resolve_address(home: FactoryHome, address: str | None = None) -> ClusterAddress | None:
    """The cluster to use: ``address``, else ``RAY_ADDRESS``, else a running ``factory up`` cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        return ClusterAddress.parse(address)
    from aifactory.cluster.local import LocalCluster

    state = LocalCluster(home).state()
    if state is not None and LocalCluster(home).is_alive(state):
        return ClusterAddress(gcs=state.gcs_address, dashboard_url=state.dashboard_url)
    return None


def init_ray(
    home: FactoryHome,
    *,
    address: ClusterAddress | None,
    job_metadata: dict[str, str] | None = None,
    num_cpus: int | None = None,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    metrics_export_port: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    logging_level: str = "WARNING",
) -> ClusterAddress:
    """``ray.init`` for an entrypoint: connect to ``address``, or start an embedded local cluster.

    The driver's job carries ``job_metadata`` (tenant tags), so in-process work is attributed like a
    submitted job. Returns where the cluster answers.
    """
    if address is None:
        from aifactory.security.signing import create_signing_key

        ensure_token(home)
        create_signing_key(home)  # this process starts the embedded cluster: it is its control plane
    apply_ray_env(home)
    import ray
    from ray.job_config import JobConfig

    job_config = JobConfig(metadata=dict(job_metadata or {}), runtime_env=runtime_env)
    if address is not None:
        ray.init(
            address=address.gcs or "auto",
            job_config=job_config,
            logging_level=logging_level,
            log_to_driver=True,
        )
        warn_if_unmetered()
        return address
    kwargs: dict[str, Any] = {}
    if metrics_export_port:
        kwargs["_metrics_export_port"] = metrics_export_port
    ray.init(
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 2),
        include_dashboard=True,
        dashboard_host=LOOPBACK,
        dashboard_port=dashboard_port,
        job_config=job_config,
        logging_level=logging_level,
        **kwargs,
    )
    ctx = ray.get_runtime_context()
    gcs = ctx.gcs_address
    return ClusterAddress(gcs=gcs, dashboard_url=f"http://{LOOPBACK}:{dashboard_port}")


_warned_unmetered: list[bool] = []


def warn_if_unmetered() -> bool:
    """Warn once per process when this driver's cluster runs no cost meter (its usage would go unbilled and
    tenants with quotas are refused work). Returns whether a meter runs."""
    from aifactory.cost.collector import get_collector

    if get_collector() is not None:
        return True
    if not _warned_unmetered:
        _warned_unmetered.append(True)
        logging.getLogger("aifactory.cluster").warning(
            "this Ray cluster runs no cost meter: its usage is not metered and tenants with quotas are refused "
            "work; start one with `factory meter start` (`factory up` starts it with the cluster)")
    return False


@contextlib.contextmanager
def ray_session(
    home: FactoryHome,
    *,
    address: ClusterAddress | None,
    tenant,
    workload,
    entrypoint: str,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    **init_kwargs: Any,
) -> Iterator[ClusterAddress]:
    """An entrypoint's Ray driver, tagged with ``tenant`` (a TenantRef), the workload and the code version.

    Connects to ``address`` or starts an embedded cluster (:func:`init_ray`), and shuts Ray down on exit.
    """
    from aifactory.provenance import code_version
    from aifactory.tenancy import job_metadata

    code = code_version()
    meta = job_metadata(tenant, workload=workload, code_version=code.sha, code_dirty=code.dirty,
                        extra={"entrypoint": entrypoint})
    resolved = init_ray(home, address=address, job_metadata=meta, num_cpus=num_cpus, runtime_env=runtime_env,
                        **init_kwargs)
    import ray

    try:
        yield resolved
    finally:
        ray.shutdown()
