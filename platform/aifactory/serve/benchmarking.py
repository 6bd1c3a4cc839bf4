"""The serving benchmarks' cluster: a private loopback Ray head per ingress, with Serve started.

Each benchmark starts its own Ray head (``LocalCluster`` in a temporary factory home, free ports, the
chosen Serve ingress: HAProxy or the Python proxy, the always-on meter as ``factory up`` starts it), so
figures never mix with other work's clusters, and stops exactly that head afterwards. What is measured
and how it is recorded is the measurement toolkit's (:mod:`aifactory.bench`: ``loadgen``, ``stats``,
``context``, ``results``, ``report``), not this module's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aifactory.cluster.local import free_port


_TOKEN_DIR: Path | None = None


def prepare_auth() -> Path:
    """One token for every private cluster of this process, in the environment before Ray is imported.

    Ray reads ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN_PATH`` once per process, so a driver that later joins a
    second cluster must find the same token there; call this first thing in a benchmark's ``main``.
    """
    global _TOKEN_DIR
    if _TOKEN_DIR is None:
        import secrets

        _TOKEN_DIR = Path(tempfile.mkdtemp(prefix="aif-bench-token-"))
        path = _TOKEN_DIR / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return _TOKEN_DIR / "auth_token"


@contextmanager
def private_cluster(*, ingress: str, num_cpus: int = 4, http_port: int | None = None) -> Iterator[dict]:
    """A fresh head on 127.0.0.1 with ``ingress`` ("haproxy" | "python"), this process as its driver, Serve started."""
    from aifactory.cluster.local import LocalCluster
    from aifactory.home import FactoryHome

    token = prepare_auth()
    root = Path(tempfile.mkdtemp(prefix=f"aif-bench-{ingress}-"))
    home = FactoryHome.from_env(root / "factory").ensure()
    from aifactory.cluster.connect import token_path

    home_token = token_path(home)
    home_token.parent.mkdir(parents=True, exist_ok=True)
    home_token.write_text(token.read_text())
    os.chmod(home_token, 0o600)
    cluster = LocalCluster(home)
    t0 = time.monotonic()
    for attempt in (1, 2):  # `ray start` times out on a heavily loaded host; one retry, then give up
        try:
            state, _ = cluster.up(num_cpus=num_cpus, num_gpus=0, gcs_port=free_port(), dashboard_port=free_port(),
                                  metrics_export_port=free_port(), serve_ingress=ingress,
                                  object_store_memory=512 << 20, timeout_s=180)
            break
        except Exception:
            cluster.down()
            if attempt == 2:
                raise
    import ray
    from ray import serve

    try:
        ray.init(address=state.gcs_address, logging_level="ERROR", log_to_driver=False)
        port = http_port or free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        yield {"ingress": ingress, "port": port, "home": home, "state": state, "cluster": cluster,
               "num_cpus": num_cpus, "start_s": time.monotonic() - t0}
    finally:
        try:
            serve.shutdown()
        except Exception:  # the cluster goes down next anyway
            pass
        ray.shutdown()
        cluster.down()
