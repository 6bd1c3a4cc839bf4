"""The dispatcher: one pass reads the queue and the cluster, plans (:func:`aifactory.queue.policy.plan`), and
acts: submits what may start, asks what must yield, and records how work that ran ended.

:func:`dispatch_once` is the pass. It runs under an exclusive ``flock`` on ``<home>/queue/dispatch.lock``, so two
dispatchers (the detached actor, a submitting process's inline pass) never race; a crash releases the lock with
the process. Then, in order:

1. **reconcile**: a row left ``dispatching`` by a dispatcher that died is looked up in Ray's job table by its
   submission id (found: ``running``; absent: ``queued`` again); running rows whose Ray job ended become
   ``succeeded | failed | stopped``, or ``queued`` again when they had been asked to yield (a training run
   exits with :data:`aifactory.train.yielding.PREEMPTED_EXIT_CODE` after its checkpoint); preempted jobs past
   their lane's ``grace_s`` are stopped (``ray job stop``);
2. **read** the cluster (capacity and Ray's live usage, plain ``ray job submit`` work included), the tenants'
   quotas and live holdings (the meter), and the decayed usage of past entries;
3. **plan**, then **start** each chosen entry through the front door's :func:`aifactory.workloads.launch` (a
   claimed row, a Ray job under the deterministic submission id, the run record with its queue wait, the
   ``queue_wait`` cost event) and **preempt** the chosen victims (an audit event each, in the entry and in
   its run record).

The actor (:func:`start_dispatcher`) is a detached, named Ray actor, restarted when it dies, that runs a pass
about every second; ``factory up`` starts it and ``factory down`` stops it, each through a short-lived driver
subprocess (``python -m aifactory.queue.dispatcher``), as the cost meter is. It writes its heartbeat to
``<home>/queue/dispatcher.json``, which ``factory status`` reads without a Ray connection.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aifactory import audit
from aifactory.exceptions import (
    BudgetExceeded,
    ClusterError,
    MeterUnavailable,
    QuotaExceeded,
    error_line,
    one_line,
)
from aifactory.home import FactoryHome
from aifactory.queue import metrics
from aifactory.queue.lanes import LanesConfig, load_lanes
from aifactory.queue.policy import Ask, decayed_usage, plan
from aifactory.queue.store import ACTIVE, QueueEntry, QueueStore

log = logging.getLogger("aifactory.queue")

DISPATCHER_NAME = "aifactory-dispatcher"
NAMESPACE = "aifactory"  # the cost collector's
DISPATCHER_ACTOR = "queue-dispatcher"  # who the audit log names
INTERVAL_S = 1.0
RAY_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Resources the queue plans with; Ray's node:*, memory and object store are not asked for by declarations.
_SKIP = ("node:", "memory", "object_store_memory", "objectStoreMemory")


class ClusterView(Protocol):
    def read(self) -> tuple[dict[str, float], dict[str, float]] | None:
        """(capacity, used) by Ray resource name, or None when the cluster cannot say."""


def _clean(res: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in res.items() if not any(k.startswith(s) for s in _SKIP)}


@dataclass
class DashboardView:
    """Capacity and live usage from the dashboard's cluster status (no Ray driver needed)."""

    dashboard_url: str
    headers: Mapping[str, str]

    def read(self):
        from aifactory import ray_compat

        usage = ray_compat.cluster_usage(self.dashboard_url, self.headers)
        if not usage:
            return None
        return _clean({k: v[1] for k, v in usage.items()}), _clean({k: v[0] for k, v in usage.items()})


class RayView:
    """Capacity and live usage from the GCS's resource view, for a dispatcher that is a Ray driver (the actor)."""

    def read(self):
        import ray

        total = _clean(ray.cluster_resources())
        avail = _clean(ray.available_resources())
        return total, {k: max(0.0, v - avail.get(k, 0.0)) for k, v in total.items()}


@dataclass
class PassReport:
    skipped: bool = False
    started: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)  # id -> final state
    requeued: list[str] = field(default_factory=list)
    reconciled: dict[str, str] = field(default_factory=dict)  # dispatching id -> running | queued
    errors: list[str] = field(default_factory=list)
    plan_ms: float = 0.0


def lock_path(home: FactoryHome) -> Path:
    return home.root / "queue" / "dispatch.lock"


@contextmanager
def pass_lock(home: FactoryHome, *, timeout_s: float):
    """The dispatch lock (exclusive ``flock``): yields whether it was taken within ``timeout_s``."""
    path = lock_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout_s
    got = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        yield got
    finally:
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def dispatch_once(home: FactoryHome, *, client, view: ClusterView | None, lock_timeout_s: float = 10.0,
                  now: float | None = None) -> PassReport:
    """One pass (see the module doc). ``client``: a Ray ``JobSubmissionClient`` of the cluster; ``view``: its
    capacity and live usage (None or unreadable: nothing new starts, reconciling still happens)."""
    report = PassReport()
    with pass_lock(home, timeout_s=lock_timeout_s) as got:
        if not got:
            report.skipped = True
            return report
        store = QueueStore.of(home)
        lanes = load_lanes(home)
        _reconcile(home, store, client, lanes, report)
        queued = store.list(states=("queued",))
        running = store.list(states=("running", "preempting"))
        snap = None
        if view is not None:
            try:
                snap = view.read()
            except Exception as err:  # noqa: BLE001 - the pass goes on; the reason says why nothing started
                report.errors.append(f"cluster view: {error_line(err)}")
        if snap is None:
            store.note_waits({e.id: ("the cluster's capacity is unknown (no resource report yet)", None, None, None)
                              for e in queued})
            metrics.record_pass(store, lanes, capacity=None)
            return report
        capacity, used = snap
        now = time.time() if now is None else now
        t0 = time.perf_counter()
        limits, held, blocked = _tenant_limits(home, {e.tenant for e in queued})
        history = store.list(states=("running", "preempting", "succeeded", "failed", "stopped"),
                             since=now - 10 * lanes.usage_half_life_s)
        past = decayed_usage(((e.tenant, e.resources, e.started_at, e.finished_at) for e in history
                              if e.started_at is not None), capacity=capacity, now=now,
                             half_life_s=lanes.usage_half_life_s)
        runtimes = store.median_runtimes(since=now - 86400)

        def runtime_s(a: Ask) -> float:
            return a.expected_runtime_s or runtimes.get(a.name) or lanes.default_runtime_s

        asks = [_ask(e) for e in queued if e.tenant not in blocked]
        p = plan(queued=asks, running=[_ask(e) for e in running], capacity=capacity, used=used, lanes=lanes,
                 past_usage=past, tenant_held=held, tenant_limits=limits, now=now, runtime_s=runtime_s)
        report.plan_ms = (time.perf_counter() - t0) * 1000
        by_id = {e.id: e for e in queued}
        for entry_id in p.start:
            if _start(home, store, client, by_id[entry_id], report):
                report.started.append(entry_id)
        for pre in p.preempt:
            _preempt(home, store, client, lanes, pre.id, pre.for_id, pre.reason, report)
        waits = {i: (w.reason, w.eta_s, w.share, w.position) for i, w in p.waiting.items()}
        waits.update({e.id: (blocked[e.tenant], None, None, None) for e in queued if e.tenant in blocked})
        store.note_waits(waits)
        metrics.record_pass(store, lanes, capacity=capacity, plan_ms=report.plan_ms)
    return report


def _ask(e: QueueEntry) -> Ask:
    return Ask(id=e.id, tenant=e.tenant, lane=e.lane, priority=e.priority, resources=e.resources,
               enqueued_at=e.enqueued_at, name=e.name, kind=e.kind, pool=e.pool, state=e.state,
               started_at=e.started_at, expected_runtime_s=e.expected_runtime_s)


def _tenant_limits(home: FactoryHome, tenants: set[str]):
    """(limits, held, blocked): each tenant's all-pools quota in Ray's spelling, its live holdings from the
    meter, and the tenants whose work may not start now because the meter is not fresh (fail closed)."""
    from aifactory.cost.budgets import load_budgets
    from aifactory.cost.ledger import Ledger

    cfg = load_budgets(home)
    limits: dict[str, dict[str, float]] = {}
    held: dict[str, dict[str, float]] = {}
    blocked: dict[str, str] = {}
    ledger = None
    for t in tenants:
        q = (cfg.tenants.get(t).quota if cfg.tenants.get(t) else None)
        if q is None or (q.cpu is None and q.gpu is None):
            continue
        limits[t] = {k: v for k, v in (("CPU", q.cpu), ("GPU", q.gpu)) if v is not None}
        ledger = ledger or Ledger.of(home)
        live = ledger.live(t, max_age_s=cfg.live_max_age_s)
        if live is None:
            blocked[t] = (f"the cost meter is not fresh and tenant {t} has a quota: waiting for a sample "
                          "(`factory meter status`)")
            continue
        held[t] = {k.upper(): float(v) for k, v in live.items()}
    return limits, held, blocked


def _reconcile(home: FactoryHome, store: QueueStore, client, lanes: LanesConfig, report: PassReport) -> None:
    from aifactory.workloads.launch import update_record

    active = store.list(states=ACTIVE)
    if not active:
        return
    jobs = {}
    for d in client.list_jobs():
        if d.submission_id:
            jobs[d.submission_id] = d
    now = time.time()
    for e in active:
        d = jobs.get(e.submission_id or "")
        if e.state == "dispatching":  # a dispatcher died between claim and mark
            if d is not None:
                store.transition(e.id, ("dispatching",), "running", started_at=e.started_at or now, reason=None)
                report.reconciled[e.id] = "running"
            else:
                store.transition(e.id, ("dispatching",), "queued", attempts=max(0, e.attempts - 1),
                                 submission_id=None, reason="re-queued: its dispatch did not reach Ray")
                report.reconciled[e.id] = "queued"
            continue
        status = None if d is None else getattr(d.status, "value", str(d.status))
        if d is None or status in RAY_TERMINAL:
            exit_code = None if d is None else getattr(d, "driver_exit_code", None)
            yielded = not e.payload.get("stop_requested") and (
                e.state == "preempting" or (e.kind == "train" and exit_code == _preempted_exit_code()))
            if yielded and status != "SUCCEEDED":
                # Back in the queue with its first enqueue time (it is older than what came since); its next
                # wait counts from now.
                store.transition(e.id, ("running", "preempting"), "queued", started_at=None, submission_id=None,
                                 reason="preempted: back in the queue", payload={**e.payload, "requeued_at": now})
                update_record(home, e.id, status="preempted", finished_at=now)
                report.requeued.append(e.id)
                continue
            state = {"SUCCEEDED": "succeeded", "STOPPED": "stopped"}.get(status or "", "failed")
            end = (d.end_time / 1000) if d is not None and d.end_time else now
            why = "its Ray job is gone from the job table" if d is None else (one_line(d.message or "")[:300] or status)
            store.transition(e.id, ("running", "preempting"), state, finished_at=end, reason=why)
            update_record(home, e.id, status="succeeded" if state == "succeeded" else "failed", finished_at=end,
                          error=None if state == "succeeded" else why, ray_job_id=None if d is None else d.job_id)
            report.finished[e.id] = state
            continue
        if e.state == "preempting":  # still running: stop it once its lane's grace is over
            pre = e.preemptions[-1] if e.preemptions else {}
            lane = lanes.lanes.get(e.lane)
            grace = lane.preemption.grace_s if lane else 0.0
            if not pre.get("stopped_at") and now - float(pre.get("at", now)) >= grace:
                try:
                    client.stop_job(e.submission_id)
                except Exception as err:  # noqa: BLE001 - retried next pass; the entry says why
                    report.errors.append(f"stop {e.submission_id}: {error_line(err)}")
                    continue
                pres = [*e.preemptions[:-1], {**pre, "stopped_at": now}]
                store.transition(e.id, ("preempting",), "preempting", preemptions=pres)


def _preempted_exit_code() -> int | None:
    try:
        from aifactory.train.yielding import PREEMPTED_EXIT_CODE
    except ImportError:
        return None
    return PREEMPTED_EXIT_CODE


def _start(home: FactoryHome, store: QueueStore, client, entry: QueueEntry, report: PassReport) -> bool:
    """Claim, submit through the front door, mark running. Returns whether it started."""
    from aifactory.workloads.launch import launch
    from aifactory.workloads.spec import Workload

    claimed = store.claim(entry.id)
    if claimed is None:  # someone else moved it (cancelled meanwhile)
        return False
    sub_id, attempt = claimed.submission_id, claimed.attempts
    now = time.time()
    since = float(entry.payload.get("requeued_at") or entry.enqueued_at)
    wait_s = entry.queue_wait_s + max(0.0, now - since)
    job = dict(entry.payload.get("job") or {})
    env = dict(job.get("runtime_env") or {})
    if entry.kind == "train":  # a re-run resumes the same run from its last checkpoint
        env["env_vars"] = {**(env.get("env_vars") or {}), "AIFACTORY_RUN_ID": entry.payload.get("run_id", entry.id)}
    meta = {**(job.get("metadata") or {}), "queue_entry": entry.id, "queue_attempt": str(attempt),
            "lane": entry.lane}
    workload = Workload.model_validate(entry.payload["workload"])

    def run(handle) -> str:
        kwargs = {k: job[k] for k in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                                      "entrypoint_resources") if job.get(k) is not None}
        try:
            client.submit_job(entrypoint=job["entrypoint"], metadata=meta, runtime_env=env or None,
                              submission_id=sub_id, **kwargs)
        except RuntimeError as err:
            if "already exists" not in str(err):  # Ray's guard: that attempt was submitted before a crash
                raise
        handle.ref("submission_id", sub_id)
        handle.event("queue_wait", f"queue_wait-a{attempt}", count=wait_s)
        return sub_id

    try:
        launch(workload, home=home, run=run, record_id=entry.id, actor=entry.actor, detached=True,
               queued_at=entry.enqueued_at, queue_wait_s=wait_s, attempt=attempt, preemptions=entry.preemptions,
               own_job=False)
    except (QuotaExceeded, MeterUnavailable) as err:  # holdings moved since the plan: wait again
        store.transition(entry.id, ("dispatching",), "queued", attempts=attempt - 1, submission_id=None,
                         reason=str(err)[:300])
        return False
    except BudgetExceeded as err:  # no new work for this tenant this period: never start
        store.transition(entry.id, ("dispatching",), "failed", finished_at=time.time(), reason=str(err)[:300])
        report.finished[entry.id] = "failed"
        return False
    except Exception as err:  # noqa: BLE001 - Ray refused or could not be reached: back in the queue, say why
        store.transition(entry.id, ("dispatching",), "queued", attempts=attempt - 1, submission_id=None,
                         reason=f"dispatch failed, will retry: {error_line(err)[:280]}")
        report.errors.append(f"start {entry.id}: {error_line(err)}")
        return False
    store.transition(entry.id, ("dispatching",), "running", started_at=time.time(), queue_wait_s=wait_s,
                     reason=None, eta_s=None, position=None)
    metrics.record_start(entry, wait_s)
    return True


def _preempt(home: FactoryHome, store: QueueStore, client, lanes: LanesConfig, victim_id: str, for_id: str,
             reason: str, report: PassReport) -> None:
    """Ask a running entry to yield: a training run through :mod:`aifactory.train.yielding` (it checkpoints
    and exits), anything else ``ray job stop`` after its lane's grace; audited, in the entry and its record."""
    from aifactory.workloads.launch import update_record

    e = store.find(victim_id)
    if e is None or e.state != "running":
        return
    now = time.time()
    lane = lanes.lanes.get(e.lane)
    pre: dict[str, Any] = {"at": now, "for": for_id, "reason": reason, "attempt": e.attempts,
                           "grace_s": lane.preemption.grace_s if lane else 0.0, "how": "stop"}
    if e.kind == "train":
        try:
            from aifactory.train.yielding import request_yield
        except ImportError as err:  # the yield protocol is not installed: stopped after the grace, as others
            pre["how"] = "stop"
            pre["yield_error"] = (f"aifactory.train.yielding is not available ({err}); the run is stopped after "
                                  "the grace and resumes from its last registered checkpoint")
        else:
            request_yield(home, e.payload.get("run_id", e.id))
            pre["how"] = "yield"
    done = store.transition(victim_id, ("running",), "preempting", preemptions=[*e.preemptions, pre])
    if done is None:
        return
    audit.record(home, actor=DISPATCHER_ACTOR, action="queue.preempt", target=victim_id, tenant=e.tenant,
                 detail={"for": for_id, "lane": e.lane, "reason": reason, "how": pre["how"], "attempt": e.attempts})
    update_record(home, victim_id, preemptions=[*e.preemptions, pre])
    metrics.record_preemption(e)
    report.preempted.append(victim_id)
    if pre["grace_s"] <= 0 and pre["how"] == "stop":
        try:
            client.stop_job(e.submission_id)
            store.transition(victim_id, ("preempting",), "preempting",
                             preemptions=[*e.preemptions, {**pre, "stopped_at": time.time()}])
        except Exception as err:  # noqa: BLE001 - the next pass retries the stop
            report.errors.append(f"stop {e.submission_id}: {error_line(err)}")


# ---- the actor ------------------------------------------------------------------------------------------------

def heartbeat_path(home: FactoryHome) -> Path:
    return home.root / "queue" / "dispatcher.json"


def health(home: FactoryHome, *, interval_s: float = INTERVAL_S) -> dict:
    """The dispatcher's last pass, from its heartbeat file (no Ray connection): what ``factory status`` shows."""
    path = heartbeat_path(home)
    if not path.is_file():
        return {"status": "not started", "hint": "factory up starts it"}
    beat = json.loads(path.read_text())
    if beat.get("stopped"):
        return {"status": "stopped", **beat}
    age = time.time() - float(beat.get("at", 0))
    return {"status": "ok" if age <= 5 * interval_s + 5 else "stale", "last_pass_age_s": round(age, 1), **beat}


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)  # holds no CPU: a 4-CPU job must fit a 4-CPU cluster
    class QueueDispatcher:
        """Runs :func:`dispatch_once` about every ``interval_s``; a restarted actor simply goes on (the
        queue and its reconciliation live in the store)."""

        def __init__(self, home: str, dashboard_url: str, interval_s: float = INTERVAL_S):
            from ray.job_submission import JobSubmissionClient

            self.home = FactoryHome.from_env(home)
            self.interval_s = interval_s
            self.client = JobSubmissionClient(dashboard_url)
            self.passes, self.last_error, self.started_at = 0, None, time.time()
            self._stop = threading.Event()
            threading.Thread(target=self._loop, daemon=True, name="queue-dispatcher").start()

        def _loop(self) -> None:
            while not self._stop.is_set():
                t0 = time.monotonic()
                self.step()
                self._stop.wait(max(0.05, self.interval_s - (time.monotonic() - t0)))

        def step(self) -> dict:
            try:
                r = dispatch_once(self.home, client=self.client, view=RayView(), lock_timeout_s=self.interval_s)
                self.passes += 1
                self.last_error = "; ".join(r.errors)[:500] or None
                out = {"started": r.started, "preempted": r.preempted, "finished": r.finished,
                       "plan_ms": round(r.plan_ms, 2)}
            except Exception as err:
                self.last_error = error_line(err)[:500]
                log.exception("queue dispatch pass failed")
                out = {"error": self.last_error}
            self._beat()
            return out

        def _beat(self, **extra) -> None:
            path = heartbeat_path(self.home)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"at": time.time(), "pid": os.getpid(), "passes": self.passes,
                                       "started_at": self.started_at, "last_error": self.last_error, **extra}))
            os.replace(tmp, path)

        def status(self) -> dict:
            return {"pid": os.getpid(), "passes": self.passes, "last_error": self.last_error}

        def stop(self) -> None:
            self._stop.set()
            self._beat(stopped=True)

    return QueueDispatcher


def start_dispatcher(home: FactoryHome, *, dashboard_url: str, interval_s: float = INTERVAL_S,
                     name: str = DISPATCHER_NAME):
    """Start (or find) the cluster's dispatcher actor, on the driver's node (the head); call from a Ray driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _actor_class().options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                  scheduling_strategy=strategy).remote(str(home.root), dashboard_url, interval_s)


def get_dispatcher(name: str = DISPATCHER_NAME):
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def stop_dispatcher(*, name: str = DISPATCHER_NAME, timeout_s: float = 30.0) -> bool:
    import ray

    handle = get_dispatcher(name)
    if handle is None:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
    return True


# ---- `python -m aifactory.queue.dispatcher start|stop`: what `factory up|down` run ---------------------------

def _run(args: list[str], *, env: dict[str, str], timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "aifactory.queue.dispatcher", *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ClusterError(f"queue dispatcher {args[0]} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_dispatcher_process(*, env: dict[str, str], gcs_address: str, dashboard_url: str, home: str,
                             timeout_s: float = 120.0) -> dict:
    """Start (or find) the dispatcher from a short-lived driver subprocess; returns its status."""
    return _run(["start", "--address", gcs_address, "--dashboard-url", dashboard_url, "--home", home], env=env,
                timeout_s=timeout_s)


def stop_dispatcher_process(*, env: dict[str, str], gcs_address: str, timeout_s: float = 60.0) -> dict:
    return _run(["stop", "--address", gcs_address], env=env, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(prog="python -m aifactory.queue.dispatcher", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start")
    s.add_argument("--address", required=True)
    s.add_argument("--dashboard-url", required=True)
    s.add_argument("--home", required=True)
    t = sub.add_parser("stop")
    t.add_argument("--address", required=True)
    ns = p.parse_args(argv)
    ray.init(address=ns.address, logging_level="ERROR", log_to_driver=False)
    if ns.verb == "start":
        handle = start_dispatcher(FactoryHome.from_env(ns.home), dashboard_url=ns.dashboard_url)
        out = ray.get(handle.status.remote(), timeout=60)
    else:
        out = {"stopped": stop_dispatcher()}
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
