"""One snapshot of the cluster from Ray's state API: capacity, and every holder of capacity with its tenant.

Holders, each counted once:
- a submitted job's entrypoint resources (held by its supervisor actor ``_ray_internal_job_actor_<id>``),
  with the job's exact start/end times;
- placement groups (Train workers, Tune trials) by their bundles, attributed to the creator job; the
  actors and tasks inside a group are not counted again;
- other live actors by their required resources (Serve replicas as ``app/deployment``, split between
  tenants by the serving layer's per-tenant processing time when it is available);
- running normal tasks outside any group, with their exact start time.
All Serve replicas belong to the job that started Serve, so replicas are named by deployment.
Untagged jobs map to ``unattributed``. Used CPU comes from psutil for processes on this node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aifactory.cost.attribution import Holding, ResourceKey
from aifactory.cost.records import SKU_CPU, SKU_MEMORY, SKU_UNKNOWN_GPU
from aifactory.tenancy import UNATTRIBUTED, JobTags, tags_from_metadata

log = logging.getLogger("aifactory.cost")

SUPERVISOR_PREFIX = "_ray_internal_job_actor_"
GIB = float(1 << 30)
# Custom resources priced as ASICs (resource name in Ray -> price-book resource "asic").
ASIC_RESOURCES = ("TPU", "NPU", "HPU", "neuron_cores")


@dataclass
class Snapshot:
    t: float
    capacity: dict[ResourceKey, float]
    holdings: list[Holding]
    pids: dict[str, list[int]] = field(default_factory=dict)  # holder -> pids on this node
    node_id: str | None = None
    serve_usage: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # app -> tenant -> counters


def resource_keys(resources: Mapping[str, float], *, accelerator: str, asic_sku: str) -> dict[ResourceKey, float]:
    """Ray resources -> price-book keys. Placement-group keys (``CPU_group_...``) are dropped."""
    out: dict[ResourceKey, float] = {}
    for name, amount in (resources or {}).items():
        if not amount or "_group_" in name:
            continue
        if name == "CPU":
            out[("cpu", SKU_CPU)] = out.get(("cpu", SKU_CPU), 0.0) + float(amount)
        elif name == "GPU":
            out[("gpu", accelerator)] = out.get(("gpu", accelerator), 0.0) + float(amount)
        elif name == "memory":
            out[("memory", SKU_MEMORY)] = out.get(("memory", SKU_MEMORY), 0.0) + float(amount) / GIB
        elif name in ASIC_RESOURCES:
            out[("asic", asic_sku)] = out.get(("asic", asic_sku), 0.0) + float(amount)
    return out


def _accelerators(nodes) -> tuple[str, str]:
    gpu, asic = SKU_UNKNOWN_GPU, "unknown-asic"
    for n in nodes:
        for key in (n.resources_total or {}):
            if key.startswith("accelerator_type:"):
                kind = key.split(":", 1)[1]
                if kind.upper().startswith("TPU"):
                    asic = kind.upper()
                else:
                    gpu = kind
    return gpu, asic


def take_snapshot(address: str | None, *, last_serve: Mapping | None = None, timeout_s: int = 30) -> Snapshot:
    """Read the cluster through the state API (``address``: the dashboard URL or None for the current one)."""
    from ray.util import state

    kw = {"address": address, "timeout": timeout_s, "raise_on_missing_output": False}
    t = time.time()
    nodes = [n for n in state.list_nodes(detail=True, limit=10000, **kw) if n.state == "ALIVE"]
    gpu_sku, asic_sku = _accelerators(nodes)
    capacity: dict[ResourceKey, float] = {}
    for n in nodes:
        for key, amount in resource_keys(n.resources_total, accelerator=gpu_sku, asic_sku=asic_sku).items():
            capacity[key] = capacity.get(key, 0.0) + amount
    keys = lambda res: resource_keys(res, accelerator=gpu_sku, asic_sku=asic_sku)  # noqa: E731

    jobs = state.list_jobs(detail=True, limit=10000, **kw)
    tags_by_job: dict[str, JobTags] = {}
    by_submission = {}
    for j in jobs:
        tags = tags_from_metadata(j.metadata)
        if j.job_id:
            tags_by_job[j.job_id] = tags
        if j.submission_id:
            by_submission[j.submission_id] = j

    def tags_of(job_id: str | None) -> JobTags:
        return tags_by_job.get(job_id or "", JobTags())

    holdings: list[Holding] = []
    pids: dict[str, list[int]] = {}
    me = None
    try:
        import ray

        if ray.is_initialized():
            me = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - only used to decide which pids psutil can see
        me = None

    actors = state.list_actors(detail=True, limit=10000, **kw)
    serve_apps = set()
    for a in actors:
        name = a.name or ""
        if name.startswith(SUPERVISOR_PREFIX):
            sub_id = name[len(SUPERVISOR_PREFIX):]
            job = by_submission.get(sub_id)
            res = keys(a.required_resources)
            if job is None or not res or job.start_time is None:
                continue
            terminal = str(getattr(job.status, "value", job.status)) in ("SUCCEEDED", "FAILED", "STOPPED")
            if a.state != "ALIVE" and not terminal:
                continue
            tags = tags_from_metadata(job.metadata)
            end = job.end_time / 1000.0 if terminal and job.end_time else None
            holder = f"job:{sub_id}"
            holdings.append(Holding(holder, tags.tenant, res, start=job.start_time / 1000.0, end=end,
                                    project=tags.project, workload=tags.workload,
                                    job_id=job.job_id or sub_id))
            if a.pid and a.state == "ALIVE" and a.node_id == me:
                pids[holder] = [a.pid]
            continue
        if a.state != "ALIVE" or a.placement_group_id:
            continue
        res = keys(a.required_resources)
        holder = f"actor:{a.actor_id}"
        if a.pid and a.node_id == me:
            pids[holder] = [a.pid]
        if not res:
            continue
        tags = tags_of(a.job_id)
        deployment = ""
        cls = a.class_name or ""
        if cls.startswith("ServeReplica:"):
            parts = cls.split(":")
            app, dep = (parts[1], parts[2]) if len(parts) >= 3 else ("", parts[-1])
            deployment = f"{app}/{dep}"
            serve_apps.add(app)
        holdings.append(Holding(holder, tags.tenant, res, project=tags.project,
                                workload="serve" if deployment else tags.workload,
                                job_id=a.job_id or "", deployment=deployment))

    for pg in state.list_placement_groups(detail=True, limit=10000, **kw):
        if pg.state != "CREATED":
            continue
        res: dict[ResourceKey, float] = {}
        for bundle in pg.bundles or []:
            for k, v in keys(bundle.get("unit_resources", bundle)).items():
                res[k] = res.get(k, 0.0) + v
        if not res:
            continue
        tags = tags_of(pg.creator_job_id)
        holdings.append(Holding(f"pg:{pg.placement_group_id}", tags.tenant, res, project=tags.project,
                                workload=tags.workload, job_id=pg.creator_job_id or ""))

    tasks = state.list_tasks(filters=[("state", "=", "RUNNING")], detail=True, limit=10000, **kw)
    for task in tasks:
        if str(getattr(task.type, "value", task.type)) != "NORMAL_TASK" or task.placement_group_id:
            continue
        res = keys(task.required_resources)
        if not res:
            continue
        tags = tags_of(task.job_id)
        holder = f"task:{task.task_id}:{task.attempt_number}"
        start = task.start_time_ms / 1000.0 if task.start_time_ms else None
        holdings.append(Holding(holder, tags.tenant, res, start=start, project=tags.project,
                                workload=tags.workload, job_id=task.job_id or ""))
        if task.worker_pid and task.node_id == me:
            pids[holder] = [task.worker_pid]

    serve_usage = read_serve_usage() if serve_apps else {}
    if serve_usage:
        holdings = [_with_shares(h, serve_usage, last_serve or {}) for h in holdings]
    return Snapshot(t=t, capacity=capacity, holdings=holdings, pids=pids, node_id=me, serve_usage=serve_usage)


def read_serve_usage() -> dict[str, dict[str, dict[str, float]]]:
    """Cumulative per-tenant counters of every Serve app from the serving layer's usage book, if it runs."""
    try:
        import ray

        from aifactory.serve.usage import BOOK_NAME, NAMESPACE
    except ImportError:
        return {}
    try:
        book = ray.get_actor(BOOK_NAME, namespace=NAMESPACE)
    except ValueError:  # no serving layer usage book on this cluster
        return {}
    return ray.get(book.get.remote(None), timeout=10)


def _with_shares(h: Holding, usage: Mapping, last: Mapping) -> Holding:
    """A replica's tenant shares: processing seconds since the last sample (cumulative if none moved)."""
    if not h.deployment:
        return h
    app = h.deployment.split("/", 1)[0]
    now = usage.get(app) or {}
    before = last.get(app) or {}
    delta = {t: float(r.get("processing_s", 0.0)) - float((before.get(t) or {}).get("processing_s", 0.0))
             for t, r in now.items()}
    if sum(v for v in delta.values() if v > 0) <= 0:
        delta = {t: float(r.get("processing_s", 0.0)) for t, r in now.items()}
    shares = {(t if t and t != UNATTRIBUTED else UNATTRIBUTED): v for t, v in delta.items() if v > 0}
    return Holding(h.holder, h.tenant, h.resources, h.start, h.end, h.project, h.workload, h.job_id,
                   h.deployment, shares or None)


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of ``pids`` and their live children; None if none can be read."""
    import psutil

    total, seen = 0.0, False
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for proc in procs:
            try:
                ct = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += ct.user + ct.system
            seen = True
    return total if seen else None


def gpu_status() -> str:
    """NVML on this node: "ok (N devices)" or why GPU usage is "unknown"."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return f"ok ({pynvml.nvmlDeviceGetCount()} devices)"
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # noqa: BLE001 - any NVML failure means "unknown", which reports show
        return f"unknown ({type(err).__name__})"
