"""``factory up | down | status``: the local Ray head on 127.0.0.1."""

from __future__ import annotations

import argparse
import time

from aifactory.cli._common import home_of, parse_bytes
from aifactory.cli._output import add_format, emit_obj, human_duration, progress
from aifactory.cluster.local import LocalCluster


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local Ray head on 127.0.0.1 (idempotent)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs (default: max(4, cores))")
    p.add_argument("--num-gpus", type=int, help="GPUs (default: detected through NVML)")
    p.add_argument("--port", type=int, default=6379, help="GCS port")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics export port")
    p.add_argument("--serve-ingress", choices=("haproxy", "python"), default="haproxy",
                   help="Ray Serve ingress: bundled HAProxy (default) or the Python proxy")
    p.add_argument("--object-store-memory", help="object store size, e.g. 1GiB (default: Ray's)")
    add_format(p)
    p.set_defaults(func=_up)

    p = sub.add_parser("down", help="stop the local Ray head this home started (idempotent)")
    p.set_defaults(func=_down)

    p = sub.add_parser("status", help="address, resources and state of the local Ray head")
    add_format(p)
    p.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    cluster = LocalCluster(home_of(args))
    t0 = time.monotonic()
    if cluster.state() is None or not cluster.is_alive(cluster.state()):
        progress("starting a local Ray head on 127.0.0.1 ...")
    state, started = cluster.up(
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        gcs_port=args.port,
        dashboard_port=args.dashboard_port,
        metrics_export_port=args.metrics_port,
        serve_ingress=args.serve_ingress,
        object_store_memory=parse_bytes(args.object_store_memory) if args.object_store_memory else None,
    )
    emit_obj(
        {
            "status": "started" if started else "already up",
            "address": state.gcs_address,
            "dashboard": state.dashboard_url,
            "metrics": f"http://127.0.0.1:{state.metrics_export_port}/metrics",
            "token": state.token_path,
            "seconds": round(time.monotonic() - t0, 1),
        },
        args.format,
    )
    if args.format == "table" and started:
        print("\nsubmit work: factory submit --tenant TEAM -- python my_script.py")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = LocalCluster(home_of(args)).down()
    print("stopped" if stopped else "not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    cluster = LocalCluster(home_of(args))
    state = cluster.state()
    if state is None or not cluster.is_alive(state):
        emit_obj({"status": "down", "home": str(cluster.home.root)}, args.format)
        return 3
    resources = cluster.resources(state)
    emit_obj(
        {
            "status": "up",
            "address": state.gcs_address,
            "dashboard": state.dashboard_url,
            "metrics_export_port": state.metrics_export_port,
            "uptime": human_duration(time.time() - state.started_at),
            "ray_version": state.ray_version,
            "serve_ingress": state.serve_ingress,
            "resources_total": resources["total"],
            "resources_used": resources["used"],
        },
        args.format,
    )
    return 0
