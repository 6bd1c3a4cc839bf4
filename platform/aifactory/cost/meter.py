"""The always-on meter: the collector actor started with the cluster and stopped with it.

``factory up`` starts it (:func:`start_meter`) as a detached, named actor with a restart policy, so it
outlives the driver that created it and comes back after its process dies; ``factory down`` flushes and
stops it (:func:`stop_meter`); ``factory status`` reads its health from the ledger
(:func:`aifactory.cost.ledger.Ledger.meter_health`), without a Ray connection. Each runs in a short-lived
driver subprocess (``python -m aifactory.cost.meter``), so the calling process never becomes a Ray driver
of the cluster it manages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from aifactory.exceptions import ClusterError

DEFAULT_SAMPLE_INTERVAL_S = 10.0
DEFAULT_WINDOW_S = 60.0


def _run(args: list[str], *, env: dict[str, str], timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "aifactory.cost.meter", *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ClusterError(f"meter {args[0]} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_meter(*, env: dict[str, str], gcs_address: str, dashboard_url: str, ledger_path: str,
                sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S, window_s: float = DEFAULT_WINDOW_S,
                timeout_s: float = 180.0) -> dict:
    """Start (or find) the cluster's collector; returns its status (``cluster_id``, ``pid``, ...)."""
    return _run(["start", "--address", gcs_address, "--dashboard-url", dashboard_url, "--ledger", ledger_path,
                 "--interval", str(sample_interval_s), "--window", str(window_s)], env=env, timeout_s=timeout_s)


def stop_meter(*, env: dict[str, str], gcs_address: str, timeout_s: float = 120.0) -> dict:
    """Flush the collector's closed windows and stop it; ``{"stopped": bool}``."""
    return _run(["stop", "--address", gcs_address], env=env, timeout_s=timeout_s)


def cluster_id() -> str:
    """This Ray cluster's identity in the ledger: its head node id (new for every cluster start)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("Resources", {}).get("node:__internal_head__"):
            return "ray-" + node["NodeID"][:16]
    return "ray-" + ray.get_runtime_context().get_node_id()[:16]


def _connect(address: str) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)


def _start(ns: argparse.Namespace) -> dict:
    import ray

    from aifactory.cost.collector import CollectorConfig, get_collector, start_collector

    _connect(ns.address)
    handle = get_collector()
    if handle is None:
        config = CollectorConfig(ledger_path=ns.ledger, cluster_id=cluster_id(), dashboard_url=ns.dashboard_url,
                                 sample_interval_s=ns.interval, window_s=ns.window)
        handle = start_collector(config)
    deadline = time.monotonic() + 120
    status = ray.get(handle.status.remote(), timeout=120)
    while status["samples"] == 0 and time.monotonic() < deadline:  # the first sample makes quotas work
        time.sleep(0.5)
        status = ray.get(handle.status.remote(), timeout=60)
    return status


def _stop(ns: argparse.Namespace) -> dict:
    import ray

    from aifactory.cost.collector import get_collector, stop_collector

    _connect(ns.address)
    handle = get_collector()
    if handle is None:
        return {"stopped": False}
    status = ray.get(handle.flush.remote(), timeout=60)
    stop_collector()
    return {"stopped": True, "windows": status.get("windows"), "cursor": status.get("cursor")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aifactory.cost.meter", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start")
    s.add_argument("--address", required=True)
    s.add_argument("--dashboard-url", required=True)
    s.add_argument("--ledger", required=True)
    s.add_argument("--interval", type=float, default=DEFAULT_SAMPLE_INTERVAL_S)
    s.add_argument("--window", type=float, default=DEFAULT_WINDOW_S)
    t = sub.add_parser("stop")
    t.add_argument("--address", required=True)
    ns = p.parse_args(argv)
    out = _start(ns) if ns.verb == "start" else _stop(ns)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
