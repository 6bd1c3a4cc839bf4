"""The collector: one detached, named Ray actor per cluster that samples the state API and fills the ledger.

Every ``sample_interval_s`` it takes a :class:`~aifactory.cost.sampler.Snapshot`, feeds the pure
:class:`~aifactory.cost.attribution.Tracker`, measures used CPU with psutil, and publishes each tenant's
current holdings (for quotas). Each closed window of ``window_s`` seconds (aligned to the clock) is
attributed and committed to the ledger in one transaction together with the tracker state, so a
collector killed at any point and restarted resumes at the first uncommitted window: nothing lost,
nothing counted twice (record keys are idempotent too). Holders that Ray gives start/end times for
(jobs, tasks) are exact across the gap; others get a midpoint estimate. Tasks that start and end between
two samples come from the state API's finished tasks; a window waits while a submitted job that started
in it is still PENDING (up to ``pending_hold_s``), since its holding begins at its start.

Used resources: CPU time per worker process (psutil, this node), and on GPU nodes NVML's utilisation,
memory and energy per device and process, read by a probe actor pinned to each GPU node
(:mod:`aifactory.cost.gpu`) and attributed to holders by the state API's worker pids; "unknown" otherwise.

``factory up`` starts it with the cluster (:mod:`aifactory.cost.meter`), and ``factory down`` flushes and
stops it; :func:`start_collector` starts one from any Ray driver (``factory run`` does on an embedded cluster).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from pathlib import Path

from pydantic import Field

from aifactory.config import StrictModel
from aifactory.cost.attribution import CapacityPoint, Tracker, attribute, keys_from_json, keys_to_json, split_key
from aifactory.cost.gpu import GpuMeter, GpuUse
from aifactory.cost.ledger import Ledger
from aifactory.cost.records import PricingClass, Resource
from aifactory.cost.spans import SpanReader, over_declared, retag
from aifactory.tenancy import UNATTRIBUTED

log = logging.getLogger("aifactory.cost")

COLLECTOR_NAME = "aifactory-cost-collector"
OVER_DECLARED = "over_declared"  # the alert kind of a job that holds more than it declared
NAMESPACE = "aifactory"


class CollectorConfig(StrictModel):
    ledger_path: str = Field(description="SQLite ledger file (FactoryHome.ledger_path).")
    cluster_id: str = Field(default="default", description="Names this cluster's cursor in a shared ledger.")
    dashboard_url: str | None = Field(default=None, description="State API address; None = the current cluster.")
    sample_interval_s: float = Field(default=10.0, gt=0, le=300, description="Seconds between samples.")
    window_s: float = Field(default=60.0, gt=0, description="Ledger window; a multiple of the sample interval.")
    region: str = Field(default="local", description="Price-book region of this cluster.")
    pricing_class: PricingClass = Field(
        default=PricingClass.ON_DEMAND,
        description="Pricing class of nodes without an aifactory.io/pricing-class label (reserved, on-demand, spot).",
    )
    exporter_port: int | None = Field(default=None, description="Serve the Prometheus exporter on 127.0.0.1:port.")
    pending_hold_s: float = Field(
        default=300.0, ge=0,
        description="Hold back windows after a submitted job's start while the job is PENDING, for at most this "
                    "long: its holding begins at its start, which must not fall in a committed window.",
    )


class CollectorCore:
    """The collector's logic without the actor: :meth:`step` samples once and commits closed windows."""

    def __init__(self, config: CollectorConfig):
        self.config = config
        self.ledger = Ledger(config.ledger_path)
        cursor, state = self.ledger.collector_state(config.cluster_id)
        self.tracker = Tracker.from_json(state.get("tracker"))
        self.capacity = [CapacityPoint(p["t"], keys_from_json(p["resources"])) for p in state.get("capacity", [])]
        now = time.time()
        self.cursor = cursor if cursor is not None else math.floor(now / config.window_s) * config.window_s
        self.resumed = cursor is not None
        self._last_cpu: dict[str, float] = {}
        self._used: dict[tuple[float, str], float] = defaultdict(float)  # (window start, holder) -> CPU-s
        self._gpu_used: dict[tuple[float, str], GpuUse] = {}  # (window start, holder) -> NVML readings
        self._last_serve: dict = state.get("serve", {})
        self._serve_rows: dict[tuple[float, str, str], dict] = {}
        self._hold_from: float | None = None  # commit no window ending after this (a job still pending)
        self.samples = 0
        self.windows = 0
        self.records = 0
        self.last_error: str | None = None
        from aifactory.cost.sampler import gpu_status

        self.gpu = gpu_status()  # this node's NVML; replaced by the GPU nodes' once there are any
        self.gpu_meter = GpuMeter(NAMESPACE)
        self.spans = SpanReader(Path(config.ledger_path).parent / "workloads")
        # (job id, resource) already flagged as holding more than declared, across restarts of the meter.
        self._flagged: set[tuple[str, str]] = {
            key for a in self.ledger.alerts() if a["kind"] == OVER_DECLARED and (key := _overrun_key(a["message"]))}

    def _window_of(self, t: float) -> float:
        return math.floor(t / self.config.window_s) * self.config.window_s

    def step(self) -> int:
        """Sample once; commit every window that closed. Returns the number of new ledger records."""
        from aifactory.cost.sampler import cpu_seconds, take_snapshot

        # Finished tasks that end in an uncommitted window; the tracker ignores ones it has committed.
        snap = take_snapshot(self.config.dashboard_url, last_serve=self._last_serve, finished_since=self.cursor)
        self.samples += 1
        if not self.capacity or dict(self.capacity[-1].resources) != snap.capacity:
            self.capacity.append(CapacityPoint(snap.t, dict(snap.capacity)))
        self.tracker.observe(snap.t, snap.holdings)
        self._retag()
        self._flag_overruns(snap)
        held = snap.pending_since is not None and snap.t - snap.pending_since < self.config.pending_hold_s
        self._hold_from = snap.pending_since if held else None
        for holder, pids in snap.pids.items():
            cpu = cpu_seconds(pids)
            if cpu is None:
                continue
            if holder in self._last_cpu:
                self._used[(self._window_of(snap.t), holder)] += max(0.0, cpu - self._last_cpu[holder])
            self._last_cpu[holder] = cpu
        self._track_gpus(snap)
        self._track_serve(snap)
        self._publish_live()
        return self._commit_closed()

    def _retag(self) -> None:
        """Holdings a driver took while one of its launches ran carry that launch's kind (``cost.spans``)."""
        spans = self.spans.spans()
        if not spans:
            return
        for table in (self.tracker.open, self.tracker.closed):
            for holder, h in table.items():
                table[holder] = retag(h, spans)

    def _flag_overruns(self, snap) -> None:
        """A job holding more than it declared (``factory submit --num-cpus``) gets one alert per resource:
        quotas admitted it by its declaration, so the overrun is usage no admission saw."""
        if not snap.declared:
            return
        for job_id, over in over_declared(self.tracker.open.values(), snap.declared).items():
            for resource, (held, limit) in sorted(over.items()):
                if (job_id, resource) in self._flagged:
                    continue
                self._flagged.add((job_id, resource))
                tenant = snap.job_tenants.get(job_id, UNATTRIBUTED)
                msg = _overrun_message(job_id, resource, held, limit)
                log.warning("over-declared: tenant %s: %s", tenant, msg)
                self.ledger.add_alert(tenant, OVER_DECLARED, msg)

    def _track_gpus(self, snap) -> None:
        """NVML readings of every GPU node since the last sample, by holder, into the sample's window."""
        if not snap.gpu_nodes and not self.gpu_meter.status:
            return  # no GPU in the cluster: GPU use stays "unknown" (self.gpu says why)
        uses = self.gpu_meter.sample(snap.gpu_nodes, snap.owners)
        self.gpu = "; ".join(f"node {n[:12]}: {st}" for n, st in sorted(self.gpu_meter.status.items())) or self.gpu
        w = self._window_of(snap.t)
        for holder, use in uses.items():
            self._gpu_used.setdefault((w, holder), GpuUse(holder)).add(use)

    def _track_serve(self, snap) -> None:
        w = self._window_of(snap.t)
        for app, tenants in snap.serve_usage.items():
            for tenant, row in tenants.items():
                before = (self._last_serve.get(app) or {}).get(tenant) or {}
                key = (w, app, tenant)
                acc = self._serve_rows.setdefault(key, {"requests": 0.0, "processing_s": 0.0, "tokens": 0.0,
                                                        "answered": 0.0, "rejected": 0.0})
                for k in acc:
                    acc[k] += max(0.0, float(row.get(k, 0.0)) - float(before.get(k, 0.0)))
        if snap.serve_usage:
            self._last_serve = {a: {t: dict(r) for t, r in ts.items()} for a, ts in snap.serve_usage.items()}

    def _publish_live(self) -> None:
        amounts: dict[tuple[str, str], float] = defaultdict(float)
        by_pool: dict[tuple[str, str, str], float] = defaultdict(float)
        for h in self.tracker.open.values():
            total = sum(v for v in (h.shares or {}).values() if v > 0)
            parts = ([(k.split("/")[0], v / total) for k, v in h.shares.items() if v > 0] if total
                     else [(h.tenant, 1.0)])
            for key, amount in h.resources.items():  # all-pools quotas count a resource across pools
                resource, _sku, pool, _cls = split_key(key)
                for tenant, frac in parts:
                    amounts[(tenant, resource)] += amount * frac
                    by_pool[(tenant, resource, pool)] += amount * frac
        self.ledger.set_live(self.config.cluster_id, amounts, by_pool=by_pool)

    def _commit_closed(self) -> int:
        written = 0
        w = self.config.window_s
        # Samples further apart than this are an outage: the tracker bills no guessed edge in it, the gap
        # is "unknown". Saved with the tracker's state, so a collector restarted after one knows it.
        self.tracker.max_gap_s = 3 * self.config.sample_interval_s
        # Commit a window only after two more samples: a holder missing from one partial state-API answer
        # is reopened by the tracker before its window is written.
        lag = 2 * self.config.sample_interval_s
        while (self.tracker.last_t is not None and self.cursor + w <= self.tracker.last_t - lag
               and (self._hold_from is None or self.cursor + w <= self._hold_from)):
            start, end = self.cursor, self.cursor + w
            records = attribute(self.tracker.holdings(), self.capacity, start, end,
                                region=self.config.region, pricing_class=self.config.pricing_class)
            records = self._attach_used(records, start)
            serve_rows = [
                {"key": f"{self.config.cluster_id}|{ws}|{app}|{tenant}", "window_start": ws, "window_end": ws + w,
                 "tenant": tenant or UNATTRIBUTED, "application": app, **vals}
                for (ws, app, tenant), vals in self._serve_rows.items() if ws == start
            ]
            # The state after this window, built beside the current one and adopted only once the ledger
            # has it: a commit that raises leaves everything in place to write the same window again.
            tracker = self.tracker.pruned(end)
            before = [p for p in self.capacity if p.t < end]
            capacity = before[-1:] + [p for p in self.capacity if p.t >= end]
            state = {
                "tracker": tracker.to_json(),
                "capacity": [{"t": p.t, "resources": keys_to_json(p.resources)} for p in capacity],
                "serve": self._last_serve,
            }
            n = self.ledger.commit_window(self.config.cluster_id, records, cursor=end, state=state,
                                          serve_rows=serve_rows)
            self.tracker, self.capacity = tracker, capacity
            for key in [k for k in self._serve_rows if k[0] <= start]:
                del self._serve_rows[key]
            for key in [k for k in self._used if k[0] <= start]:
                del self._used[key]
            for key in [k for k in self._gpu_used if k[0] <= start]:
                del self._gpu_used[key]
            self.cursor = end
            self.windows += 1
            self.records += n
            written += n
        return written

    def _attach_used(self, records, window_start: float):
        """Set the used amounts on CPU and GPU records of holders measured in this window (else unknown)."""
        gpu = {h: u for (w, h), u in self._gpu_used.items() if w == window_start}
        return attach_used(records, cpu_s={h: v for (w, h), v in self._used.items() if w == window_start}, gpu=gpu)

    def status(self) -> dict:
        return {"cluster_id": self.config.cluster_id, "cursor": self.cursor, "samples": self.samples,
                "gpu_nodes": dict(self.gpu_meter.status),
                "windows": self.windows, "records": self.records, "resumed": self.resumed,
                "open_holders": len(self.tracker.open), "gpu": self.gpu, "last_error": self.last_error,
                "ledger": str(self.ledger.path)}


def _overrun_message(job_id: str, resource: str, held: float, limit: float) -> str:
    return f"job {job_id} holds {held:g} {resource.upper()} but declared {limit:g}"


def _overrun_key(message: str) -> tuple[str, str] | None:
    """(job id, resource) of an :func:`_overrun_message`; None for any other text."""
    parts = message.split()
    return (parts[1], parts[4].lower()) if len(parts) >= 5 and parts[0] == "job" and parts[2] == "holds" else None


def attach_used(records, *, cpu_s: dict[str, float], gpu: dict[str, GpuUse]):
    """Records of one window with what their holders used: measured CPU-seconds on CPU records; NVML's
    GPU-seconds, memory GiB-seconds and energy on GPU records. A holder's use is split over its records
    of that resource like its allocation (a shared replica's tenants, several pools). Pure."""
    alloc: dict[tuple[str, Resource], float] = defaultdict(float)
    for r in records:
        if r.holder:
            alloc[(r.holder, r.resource)] += r.quantity_s
    out = []
    for r in records:
        total = alloc.get((r.holder, r.resource), 0.0)
        if r.holder and total > 0:
            frac = r.quantity_s / total
            if r.resource == Resource.CPU and r.holder in cpu_s:
                r = r.model_copy(update={"used_s": cpu_s[r.holder] * frac})
            elif r.resource == Resource.GPU and r.holder in gpu:
                u = gpu[r.holder]
                r = r.model_copy(update={
                    "used_s": None if u.gpu_s is None else u.gpu_s * frac,
                    "gpu_memory_gib_s": None if u.memory_gib_s is None else u.memory_gib_s * frac,
                    "energy_j": None if u.energy_j is None else u.energy_j * frac,
                })
        out.append(r)
    return out


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class CostCollector:
        """Runs :class:`CollectorCore` in a thread; a restarted actor resumes from the ledger."""

        def __init__(self, config: dict):
            self.config = CollectorConfig.model_validate(config)
            self.core = CollectorCore(self.config)
            self._lock = threading.Lock()
            self._stop = threading.Event()
            self.exporter_port = None
            if self.config.exporter_port is not None:
                from aifactory.cost.exporter import serve_exporter

                self.exporter_port = serve_exporter(self.config.ledger_path, port=self.config.exporter_port)
            threading.Thread(target=self._loop, daemon=True, name="cost-collector").start()

        def _loop(self) -> None:
            while not self._stop.is_set():
                t0 = time.monotonic()
                self._step()
                self._stop.wait(max(0.0, self.config.sample_interval_s - (time.monotonic() - t0)))

        def _step(self) -> int:
            with self._lock:
                try:
                    n = self.core.step()
                    self.core.last_error = None
                    return n
                except Exception as err:  # noqa: BLE001 - keep sampling; the status shows the error
                    self.core.last_error = f"{type(err).__name__}: {err}"
                    log.exception("cost collector step failed")
                    return 0

        def flush(self) -> dict:
            """Sample now (commits closed windows) and return the status."""
            self._step()
            return self.status()

        def get_config(self) -> dict:
            return self.config.model_dump(mode="json")

        def status(self) -> dict:
            import os

            return {**self.core.status(), "pid": os.getpid(), "exporter_port": self.exporter_port}

        def stop(self) -> None:
            self._stop.set()
            with self._lock:
                self.core.gpu_meter.stop()

    return CostCollector


def start_collector(config: CollectorConfig, *, name: str = COLLECTOR_NAME):
    """Start (or find) this cluster's collector actor; call from a Ray driver. Returns its handle.

    ``name``: the meter of a cluster is the one under :data:`COLLECTOR_NAME` (``factory up`` starts it); tests
    that need a meter with their own ledger name another."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node (the head, in the factory's clusters): psutil can see the processes there.
    strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _actor_class().options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=strategy,
    ).remote(config.model_dump(mode="json"))


def get_collector(name: str = COLLECTOR_NAME):
    """The running collector's handle, or None."""
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def stop_collector(*, timeout_s: float = 30.0, name: str = COLLECTOR_NAME) -> bool:
    """Stop the collector (its committed windows stay in the ledger). Returns whether one was running."""
    import ray

    handle = get_collector(name)
    if handle is None:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
    return True
