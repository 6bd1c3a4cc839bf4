"""The private Ray APIs of aifactory.ray_compat that only a running cluster can check, on the session cluster:
the GCS actor table's times, the dashboard's cluster status, and the meter's fallback to estimated edges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from aifactory import ray_compat
from aifactory.cluster.connect import auth_headers


def _snapshot_holdings(dashboard_url: str) -> dict[str, bool]:
    from aifactory.cost.sampler import take_snapshot

    return {h.holder: h.estimated for h in take_snapshot(dashboard_url).holdings}


def test_gcs_actor_times_and_the_estimated_fallback(ray_driver):
    import ray
    from ray.util import state

    @ray.remote(num_cpus=0.1)
    class Holder:
        def ping(self) -> int:
            return 1

    t0 = time.time()
    holder = Holder.options(name="compat-live-holder").remote()
    assert ray.get(holder.ping.remote(), timeout=60) == 1
    try:
        (row,) = state.list_actors(filters=[("name", "=", "compat-live-holder")], address=ray_driver.dashboard_url)
        start, end = ray_compat.actor_times()[row.actor_id]
        assert t0 - 5 <= start <= time.time() and end is None
        key = f"actor:{row.actor_id}"
        # This process is a driver: the meter has the actor's exact start, nothing is estimated.
        assert _snapshot_holdings(ray_driver.dashboard_url)[key] is False
        # A process that is no driver cannot read the GCS table: the same actor's holding is estimated.
        env = {**ray_driver.env(), "RAY_ADDRESS": ray_driver.gcs_address}
        code = ("import json, sys; from tests.integration.test_ray_compat_live import _snapshot_holdings;"
                "print(json.dumps(_snapshot_holdings(sys.argv[1])))")
        out = subprocess.run([sys.executable, "-c", code, ray_driver.dashboard_url], capture_output=True, text=True,
                             env=env, timeout=120, cwd=os.getcwd())
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])[key] is True
    finally:
        ray.kill(holder)


def test_cluster_status_route_reports_usage(factory_cluster):
    headers = auth_headers({"RAY_AUTH_TOKEN_PATH": factory_cluster.token_path})
    deadline = time.monotonic() + 30
    usage = {}
    while not usage and time.monotonic() < deadline:  # the first report arrives a few seconds after start
        usage = ray_compat.cluster_usage(factory_cluster.dashboard_url, headers)
        time.sleep(0.5)
    used, total = usage["CPU"]
    assert total == 6.0 and 0.0 <= used <= total
