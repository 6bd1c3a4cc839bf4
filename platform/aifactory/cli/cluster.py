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
    p.add_argument("--meter-interval-s", type=float, help="cost meter: seconds between samples (default 10)")
    p.add_argument("--meter-window-s", type=float, help="cost meter: ledger window in seconds (default 60)")
    p.add_argument("--no-meter", action="store_true",
                   help="start no cost meter (usage goes unmetered and tenants with quotas are refused work)")
    p.add_argument("--no-dispatcher", action="store_true",
                   help="start no queue dispatcher (queued work then starts only on submit and wait passes)")
    add_format(p)
    p.set_defaults(func=_up)

    m = sub.add_parser("meter", help="the cost meter of the local head: start | stop | status")
    msub = m.add_subparsers(dest="meter_verb", required=True)
    ms = msub.add_parser("start", help="start the meter (factory up does; idempotent)")
    ms.add_argument("--interval-s", type=float, help="seconds between samples")
    ms.add_argument("--window-s", type=float, help="ledger window in seconds")
    add_format(ms)
    ms.set_defaults(func=_meter)
    mt = msub.add_parser("stop", help="flush the meter's closed windows and stop it")
    add_format(mt)
    mt.set_defaults(func=_meter)
    mst = msub.add_parser("status", help="last sample, commit lag, committed windows")
    add_format(mst)
    mst.set_defaults(func=_meter)

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
        meter=not args.no_meter,
        meter_sample_interval_s=args.meter_interval_s,
        meter_window_s=args.meter_window_s,
        dispatcher=not args.no_dispatcher,
    )
    emit_obj(
        {
            "status": "started" if started else "already up",
            "address": state.gcs_address,
            "dashboard": state.dashboard_url,
            "metrics": f"http://127.0.0.1:{state.metrics_export_port}/metrics",
            "token": state.token_path,
            "meter": state.meter_cluster_id or "off",
            "dispatcher": "on" if state.dispatcher else "off",
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
            "meter": cluster.meter_health(state),
            "queue_dispatcher": cluster.dispatcher_health(state),
            "gpus": gpu_lines(),
        },
        args.format,
    )
    return 0


def gpu_lines() -> str | list[str]:
    """This node's GPUs as :mod:`aifactory.telemetry` reads them, one line each, or ``unknown (<reason>)``."""
    from aifactory import telemetry

    devices = telemetry.gpus(processes=False)
    if isinstance(devices, telemetry.Unknown):
        return str(devices)

    def num(v, scale: float = 1.0, unit: str = "") -> str:
        return str(v) if isinstance(v, telemetry.Unknown) else f"{v * scale:.1f}{unit}"

    return [f"{d.index} {d.name}: util {num(d.util_pct, unit='%')}, memory {num(d.memory_used_bytes, 2**-30)}/"
            f"{num(d.memory_total_bytes, 2**-30, ' GiB')}, power {num(d.power_w, unit=' W')}" for d in devices]


def _meter(args: argparse.Namespace) -> int:
    from aifactory.exceptions import ClusterUnreachable

    cluster = LocalCluster(home_of(args))
    state = cluster.state()
    if state is None or not cluster.is_alive(state):
        raise ClusterUnreachable(str(cluster.home.root), "no `factory up` cluster for this home")
    if args.meter_verb == "start":
        progress("starting the cost meter ...")
        state = cluster.start_meter(state, sample_interval_s=args.interval_s, window_s=args.window_s)
    elif args.meter_verb == "stop":
        emit_obj(cluster.stop_meter(state), args.format)
        return 0
    emit_obj(cluster.meter_health(state), args.format)
    return 0
