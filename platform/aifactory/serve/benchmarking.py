"""Helpers of the serving benchmarks: a private loopback cluster per ingress, interleaved repeats, reports.

Each benchmark starts its own Ray head (``LocalCluster`` in a temporary factory home, free ports, the
chosen Serve ingress: HAProxy or the Python proxy), so figures never mix with other work's clusters,
and stops exactly that head afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
        yield {"ingress": ingress, "port": port, "home": home, "state": state,
               "start_s": time.monotonic() - t0}
    finally:
        try:
            serve.shutdown()
        except Exception:  # the cluster goes down next anyway
            pass
        ray.shutdown()
        cluster.down()


def interleaved(variants: dict[str, Callable[[], dict]], *, repeats: int) -> dict[str, list[dict]]:
    """Run every variant once per round, rounds ``repeats`` times (A B A B ...), so drift hits all alike."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
            print(f"  round {r + 1}/{repeats} {name}: " + _short(runs[name][-1]), flush=True)
    return runs


def below_saturation(s: dict, *, capacity: int, keep_up: float = 0.95, growth: float = 1.5,
                     slack_ms: float = 50.0, min_answers: int = 20) -> tuple[bool, str]:
    """Whether an open-loop point (a :func:`~aifactory.serve.loadgen.summarize` of ``open_loop``) ran
    below saturation, and why not. ``capacity``: the admission bound (max ongoing + max queued).

    Below saturation means: nothing rejected or failed; the generator sent at the offered rate and the
    server answered at it (both >= ``keep_up`` of it; answers counted from the first to the last); the
    requests never filled the admission bound; and latency was stable: the median of the second half of
    the run no slower than ``growth`` x the first half's (+ ``slack_ms``), where a queue that grows for the
    whole run shows. (Medians, not p99s: a p99 of a few dozen answers is one answer, and one slow answer on
    shared cores is not a growing queue.) The stability check needs ``min_answers`` answers per half."""
    offered = s["offered_rps"]
    if s["rejected"] or s["errors"]:
        return False, f"{s['rejected']} rejected, {s['errors']} failed"
    if (s.get("sent_rps") or 0.0) < keep_up * offered:
        return False, f"the generator sent {s.get('sent_rps') or 0:.0f} of {offered:.0f} rps"
    if (s.get("answered_rps") or 0.0) < keep_up * offered:
        return False, f"answered {s.get('answered_rps') or 0:.1f} of {offered:.1f} rps"
    if s["peak_in_flight"] >= capacity:
        return False, f"{s['peak_in_flight']} in flight filled the admission bound ({capacity})"
    first, second = s.get("p50_first_half_ms"), s.get("p50_second_half_ms")
    if (first is not None and second is not None and (s.get("answers_per_half") or 0) >= min_answers
            and second > growth * first + slack_ms):
        return False, f"median latency grew from {first:.0f} ms (first half) to {second:.0f} ms (second half)"
    return True, "keeps up"


def find_saturation(run_at: Callable[[float], dict], *, start_rps: float, capacity: int, step: float = 1.2,
                    max_points: int = 14, log: Callable[[str], None] = print) -> tuple[float, list[dict]]:
    """S: the highest open-loop rate that runs :func:`below_saturation`, found by raising the rate by
    ``step`` from ``start_rps`` until a point fails twice in a row (halving first while even ``start_rps`` fails).
    Returns S and every point measured (each with ``keeps_up`` and ``reason``)."""
    points: list[dict] = []
    rate, best, retried = start_rps, None, False
    for _ in range(max_points):
        s = run_at(rate)
        ok, reason = below_saturation(s, capacity=capacity)
        points.append(s | {"keeps_up": ok, "reason": reason})
        log(f"  calibrate {rate:7.1f} rps offered: sent {s.get('sent_rps') or 0:6.1f}, answered "
            f"{s.get('answered_rps') or 0:6.1f} rps, p99 {s['p99_ms']:6.0f} ms, median by half {s.get('p50_first_half_ms') or 0:.0f}/"
            f"{s.get('p50_second_half_ms') or 0:.0f} ms, peak in flight {s['peak_in_flight']}, rejected "
            f"{s['rejected']}: {reason}")
        if ok:
            best, retried = rate, False
            rate *= step
        elif best is None:
            rate /= 2
        elif not retried:
            retried = True  # one noisy point (the cores are shared) must not end the search: measure it again
        else:
            break
    if best is None:
        raise RuntimeError(f"no open-loop rate down to {rate:.1f} rps ran below saturation: {points[-1]['reason']}")
    return best, points


def medians(runs: list[dict]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(vals) if vals else None
    return out


def _short(s: dict) -> str:
    parts = []
    for k in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "rejected", "errors"):
        if s.get(k) is not None:
            parts.append(f"{k}={s[k]:.1f}" if isinstance(s[k], float) else f"{k}={s[k]}")
    return " ".join(parts)


def context() -> dict[str, Any]:
    """Where a figure was measured."""
    import ray

    from aifactory.provenance import code_version

    code = code_version()
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "ray": ray.__version__, "load_average_1m": round(os.getloadavg()[0], 2), "code_version": code.sha, "code_dirty": code.dirty,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(name: str, result: dict, *, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def bar_chart(path: str | Path, title: str, groups: dict[str, dict[str, float]], metrics: list[tuple[str, str]]) -> None:
    """One panel per metric, one bar per group (e.g. variant), values annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    axes = [axes] if len(metrics) == 1 else axes
    names = list(groups)
    for ax, (key, label) in zip(axes, metrics):
        vals = [groups[n].get(key) or 0.0 for n in names]
        bars = ax.bar(names, vals, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2"][: len(names)])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
