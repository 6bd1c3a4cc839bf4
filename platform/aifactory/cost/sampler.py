"""One snapshot of the cluster from Ray's state API: capacity, and every holder of capacity with its tenant.

Holders, each counted once:
- a submitted job's entrypoint resources (held by its supervisor actor ``_ray_internal_job_actor_<id>``),
  with the job's exact start/end times;
- placement groups (Train workers, Tune trials) by their bundles, attributed to the creator job; the
  actors and tasks inside a group are not counted again;
- other actors by their required resources (Serve replicas as ``app/deployment``, split between
  tenants by the serving layer's per-tenant processing time when it is available): live ones, and
  those that died since the collector's cursor, with their start/end times from the GCS actor table;
- normal tasks outside any group: running ones with their exact start time, and those that ended since
  the collector's cursor with their exact start and end (tasks shorter than the sampling period are
  never seen running);
All Serve replicas belong to the job that started Serve, so replicas are named by deployment.
Untagged jobs map to ``unattributed``. Used CPU comes from :mod:`aifactory.telemetry` for processes on this node.
Where the GCS actor table (:func:`aifactory.ray_compat.actor_times`) cannot be read, actors' edges are
estimated by the tracker and their holdings are marked ``estimated`` (so are the usage records they give).

Every holding is keyed by the node it sits on: the node's pool and pricing class come from its Ray node
labels ``aifactory.io/pool`` / ``aifactory.io/pricing-class`` (the state API's node ``labels``, set by
cluster/), its GPU/ASIC SKU from its own accelerator type. Unlabelled nodes are pool ``default``, keyed
as before pools existed; a holder whose node is unknown is counted there too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from aifactory import ray_compat, telemetry
from aifactory.cost.attribution import Holding, ResourceKey, resource_key
from aifactory.cost.records import (
    DEFAULT_POOL, POOL_LABEL, PRICING_CLASS_LABEL, SKU_CPU, SKU_MEMORY, SKU_UNKNOWN_GPU, PricingClass,
)
from aifactory.tenancy import UNATTRIBUTED, JobTags, tags_from_metadata

log = logging.getLogger("aifactory.cost")

SUPERVISOR_PREFIX = "_ray_internal_job_actor_"
GIB = float(1 << 30)
# Custom resources priced as ASICs (resource name in Ray -> price-book resource "asic").
ASIC_RESOURCES = ("TPU", "NPU", "HPU", "neuron_cores")
TASK_LIMIT = 10000


@dataclass
class Snapshot:
    t: float
    capacity: dict[ResourceKey, float]
    holdings: list[Holding]
    pids: dict[str, list[int]] = field(default_factory=dict)  # holder -> pids on this node
    node_id: str | None = None
    serve_usage: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # app -> tenant -> counters
    # (node id, pid) -> holder, on every node: whose process is on a GPU (NVML reports pids)
    owners: dict[tuple[str, int], str] = field(default_factory=dict)
    gpu_nodes: list[str] = field(default_factory=list)  # alive nodes with GPUs: where NVML is read
    # Earliest start of a submitted job still PENDING, not yet counted (its supervisor is not up): its
    # holding will begin at that start once it shows, so windows from there on must wait for it.
    pending_since: float | None = None
    # job id -> what its submitter declared it would hold in all ({"cpu": n, "gpu": g}; the front door's
    # ``declared_cpu`` / ``declared_gpu`` job metadata), and job id -> tenant: the meter flags overruns.
    declared: dict[str, dict[str, float]] = field(default_factory=dict)
    job_tenants: dict[str, str] = field(default_factory=dict)


def resource_keys(resources: Mapping[str, float], *, accelerator: str, asic_sku: str,
                  pool: str = DEFAULT_POOL, pricing_class: str = "") -> dict[ResourceKey, float]:
    """Ray resources -> price-book keys (of ``pool``). Placement-group keys (``CPU_group_...``) are dropped."""
    out: dict[ResourceKey, float] = {}

    def add(resource: str, sku: str, amount: float) -> None:
        key = resource_key(resource, sku, pool, pricing_class)
        out[key] = out.get(key, 0.0) + amount

    for name, amount in (resources or {}).items():
        if not amount or "_group_" in name:
            continue
        if name == "CPU":
            add("cpu", SKU_CPU, float(amount))
        elif name == "GPU":
            add("gpu", accelerator, float(amount))
        elif name == "memory":
            add("memory", SKU_MEMORY, float(amount) / GIB)
        elif name in ASIC_RESOURCES:
            add("asic", asic_sku, float(amount))
    return out


def _accelerators(nodes) -> tuple[str, str]:
    """GPU and ASIC SKUs of ``nodes`` (one node: its own; several: the last seen of each kind)."""
    gpu, asic = SKU_UNKNOWN_GPU, "unknown-asic"
    for n in nodes:
        total = n.resources_total or {}
        has_asic = any(name in total for name in ASIC_RESOURCES)
        for key in total:
            if key.startswith("accelerator_type:"):
                kind = key.split(":", 1)[1]
                if kind.upper().startswith("TPU"):
                    asic = kind.upper()
                elif has_asic and "GPU" not in total:  # e.g. aws-neuron-core on an Inferentia node
                    asic = kind
                else:
                    gpu = kind
    return gpu, asic


def node_key_args(nodes) -> dict[str, dict]:
    """node id -> the :func:`resource_keys` arguments of its resources: its own accelerator types and its pool."""
    pools = node_pools(nodes)
    out: dict[str, dict] = {}
    for n in nodes:
        gpu, asic = _accelerators([n])
        pool, cls = pools[n.node_id]
        out[n.node_id] = {"accelerator": gpu, "asic_sku": asic, "pool": pool, "pricing_class": cls}
    return out


def node_pools(nodes) -> dict[str, tuple[str, str]]:
    """node id -> (pool, pricing class or "") from the nodes' Ray labels.

    Read from the state API's node records the snapshot already holds (``list_nodes(detail=True)`` carries
    the same labels as ``ray.nodes()``). A pricing class that is not reserved/on-demand/spot is ignored (logged).
    """
    out = {}
    for n in nodes:
        lab = getattr(n, "labels", None) or {}
        pool = str(lab.get(POOL_LABEL) or DEFAULT_POOL)
        cls = str(lab.get(PRICING_CLASS_LABEL) or "").strip().lower()
        if cls and cls not in {c.value for c in PricingClass}:
            log.warning("node %s: label %s=%r is not one of reserved, on-demand, spot; priced as the cluster's "
                        "default class", n.node_id, PRICING_CLASS_LABEL, cls)
            cls = ""
        out[n.node_id] = (pool, cls)
    return out


def take_snapshot(address: str | None, *, last_serve: Mapping | None = None, timeout_s: int = 30,
                  finished_since: float | None = None) -> Snapshot:
    """Read the cluster through the state API (``address``: the dashboard URL or None for the current one).

    ``finished_since``: also return the normal tasks that ended after this time (Unix seconds), with
    their exact start and end, so that tasks shorter than the sampling period are metered.
    """
    from ray.util import state

    kw = {"address": address, "timeout": timeout_s, "raise_on_missing_output": False}
    t = time.time()
    nodes = [n for n in state.list_nodes(detail=True, limit=10000, **kw) if n.state == "ALIVE"]
    gpu_sku, asic_sku = _accelerators(nodes)
    node_keys = node_key_args(nodes)
    capacity: dict[ResourceKey, float] = {}
    for n in nodes:
        for key, amount in resource_keys(n.resources_total, **node_keys[n.node_id]).items():
            capacity[key] = capacity.get(key, 0.0) + amount

    def keys(res, node_id: str | None) -> dict[ResourceKey, float]:
        # A holder on an unknown node (not alive any more) is counted in the default pool.
        kw_node = node_keys.get(node_id or "") or {"accelerator": gpu_sku, "asic_sku": asic_sku}
        return resource_keys(res, **kw_node)

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
    owners: dict[tuple[str, int], str] = {}

    def own(node_id: str | None, pid: int | None, holder: str) -> None:
        if node_id and pid:
            owners[(node_id, int(pid))] = holder
    me = None
    try:
        import ray

        if ray.is_initialized():
            me = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - only used to decide which pids psutil can see
        me = None

    actors = state.list_actors(detail=True, limit=10000, **kw)
    times = actor_times()
    estimated = times is None  # no GCS actor times: the tracker estimates actors' edges
    times = times or {}
    serve_apps = set()
    for a in actors:
        name = a.name or ""
        if name.startswith(SUPERVISOR_PREFIX):
            sub_id = name[len(SUPERVISOR_PREFIX):]
            job = by_submission.get(sub_id)
            res = keys(a.required_resources, a.node_id)
            if job is None or not res or job.start_time is None:
                continue
            terminal = str(getattr(job.status, "value", job.status)) in ("SUCCEEDED", "FAILED", "STOPPED")
            if a.state != "ALIVE" and not terminal:
                continue
            tags = tags_from_metadata(job.metadata)
            end = job.end_time / 1000.0 if terminal and job.end_time else None
            holder = f"job:{sub_id}"
            own(a.node_id, a.pid, holder)
            driver = getattr(job, "driver_info", None)  # the entrypoint's process, a child of the supervisor
            own(getattr(job, "driver_node_id", None), getattr(driver, "pid", None), holder)
            holdings.append(Holding(holder, tags.tenant, res, start=job.start_time / 1000.0, end=end,
                                    project=tags.project, workload=tags.workload,
                                    job_id=job.job_id or sub_id))
            if a.pid and a.state == "ALIVE" and a.node_id == me:
                pids[holder] = [a.pid]
            continue
        start, end = times.get(a.actor_id, (None, None))
        if a.state != "ALIVE":
            # An actor that lived and died since the cursor (maybe between two samples): its exact span.
            if (a.placement_group_id or start is None or end is None or finished_since is None
                    or end <= finished_since):
                continue
        elif a.placement_group_id:  # its group holds its resources (Train workers, Tune trials)
            own(a.node_id, a.pid, f"pg:{a.placement_group_id}")
            continue
        else:
            end = None
        res = keys(a.required_resources, a.node_id)
        holder = f"actor:{a.actor_id}"
        if end is None:
            own(a.node_id, a.pid, holder)
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
        holdings.append(Holding(holder, tags.tenant, res, start=start, end=end, project=tags.project,
                                workload="serve" if deployment else tags.workload,
                                job_id=a.job_id or "", deployment=deployment, estimated=estimated))

    for pg in state.list_placement_groups(detail=True, limit=10000, **kw):
        if pg.state != "CREATED":
            continue
        res: dict[ResourceKey, float] = {}
        for bundle in pg.bundles or []:  # bundles of one group may sit on nodes of several pools
            for k, v in keys(bundle.get("unit_resources", bundle), bundle.get("node_id")).items():
                res[k] = res.get(k, 0.0) + v
        if not res:
            continue
        tags = tags_of(pg.creator_job_id)
        holdings.append(Holding(f"pg:{pg.placement_group_id}", tags.tenant, res, project=tags.project,
                                workload=tags.workload, job_id=pg.creator_job_id or ""))

    tasks = state.list_tasks(filters=[("state", "=", "RUNNING")], detail=True, limit=TASK_LIMIT, **kw)
    if finished_since is not None:
        # Tasks that began and ended between two samples are never seen RUNNING: take them (and the end
        # of those that were) from the finished ones, with Ray's exact start/end times. Asked per job that
        # ran since the cursor: the GCS filters by job and state before its limit but returns the *oldest*
        # first, and filters by type only after it, so one cluster-wide query would drop the newest tasks
        # once the cluster has kept more than the limit (actor tasks included).
        for job_id in sorted({j.job_id for j in jobs if j.job_id and (not j.end_time
                                                                    or j.end_time / 1000.0 > finished_since)}):
            for st in ("FINISHED", "FAILED"):
                done = state.list_tasks(filters=[("job_id", "=", job_id), ("state", "=", st)], detail=True,
                                        limit=TASK_LIMIT, **kw)
                if len(done) >= TASK_LIMIT:
                    log.warning("job %s: the state API returned %d %s tasks (its limit); tasks beyond it are not "
                                "metered", job_id, len(done), st)
                tasks = [*tasks, *done]
    seen_holders = set()
    for holding, task in task_holdings(tasks, keys=keys, tags_of=tags_of, finished_since=finished_since):
        if holding.holder in seen_holders:  # RUNNING in one answer and finished in the next: keep the finished
            holdings = [h for h in holdings if h.holder != holding.holder]
        seen_holders.add(holding.holder)
        holdings.append(holding)
        if holding.end is None:
            own(task.node_id, task.worker_pid, holding.holder)
            if task.worker_pid and task.node_id == me:
                pids[holding.holder] = [task.worker_pid]

    counted = {h.holder for h in holdings}
    pending = [j.start_time / 1000.0 for j in jobs
               if str(getattr(j.status, "value", j.status)) == "PENDING" and j.submission_id and j.start_time
               and f"job:{j.submission_id}" not in counted]
    serve_usage = read_serve_usage() if serve_apps else {}
    if serve_usage:
        holdings = [_with_shares(h, serve_usage, last_serve or {}) for h in holdings]
    gpu_nodes = [n.node_id for n in nodes if (n.resources_total or {}).get("GPU")]
    declared = {j.job_id: d for j in jobs if j.job_id and (d := declared_of(j.metadata))}
    return Snapshot(t=t, capacity=capacity, holdings=holdings, pids=pids, node_id=me, serve_usage=serve_usage,
                    owners=owners, gpu_nodes=gpu_nodes, pending_since=min(pending) if pending else None,
                    declared=declared, job_tenants={jid: tags.tenant for jid, tags in tags_by_job.items()})


def declared_of(metadata: Mapping[str, str] | None) -> dict[str, float]:
    """``{"cpu": n, "gpu": g}`` a job declared in its metadata (``declared_cpu`` / ``declared_gpu``); {} if none
    or unreadable (a job submitted outside the front door declares nothing)."""
    out = {}
    for resource in ("cpu", "gpu"):
        try:
            value = float((metadata or {}).get(f"declared_{resource}", ""))
        except ValueError:
            continue
        if value == value and value >= 0:  # not NaN
            out[resource] = value
    return out


def actor_times() -> dict[str, tuple[float | None, float | None]] | None:
    """actor id -> (start, end) in Unix seconds (None: not yet / not known) from the GCS actor table, or
    None where it cannot be read (:func:`aifactory.ray_compat.actor_times`: the state API's ``list_actors``
    has no times). Then actors get the tracker's midpoint estimates, logged, and their records are marked
    ``estimated``.
    """
    try:
        return ray_compat.actor_times()
    except ray_compat.RayCompatError as err:
        log.warning("%s: actors get estimated edges, their usage records are marked estimated", err)
        return None


def task_holdings(tasks, *, keys, tags_of, finished_since: float | None = None):
    """(Holding, task) of each normal task outside a placement group that held resources.

    Running tasks are open holdings from their start; finished (or failed) ones are closed at their end
    when they ended after ``finished_since`` (older ones were committed already). A task that never
    started (cancelled while pending) held nothing. Pure: ``tasks`` are state-API ``TaskState``-like
    objects, ``keys(resources, node_id)`` the price-book keys, ``tags_of(job_id)`` the job's tags.
    """
    for task in tasks:
        if str(getattr(task.type, "value", task.type)) != "NORMAL_TASK" or task.placement_group_id:
            continue
        state_name = str(getattr(task.state, "value", task.state))
        start = task.start_time_ms / 1000.0 if task.start_time_ms else None
        end = None
        if state_name != "RUNNING":
            if start is None or not task.end_time_ms:
                continue
            end = task.end_time_ms / 1000.0
            if finished_since is None or end <= finished_since:
                continue
        res = keys(task.required_resources, task.node_id)
        if not res:
            continue
        tags = tags_of(task.job_id)
        yield (Holding(f"task:{task.task_id}:{task.attempt_number}", tags.tenant, res, start=start, end=end,
                       project=tags.project, workload=tags.workload, job_id=task.job_id or ""), task)


def read_serve_usage() -> dict[str, dict[str, dict[str, float]]]:
    """Cumulative per-tenant counters of every Serve app from the serving layer's usage book, if it runs."""
    try:
        import ray

        from aifactory.cost.records import SERVE_USAGE_BOOK as BOOK_NAME, SERVE_USAGE_NAMESPACE as NAMESPACE
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
    """User + system CPU seconds of ``pids`` and their live children (:func:`aifactory.telemetry.cpu_seconds`);
    None (unknown, the record's ``used_s`` stays null) if none can be read."""
    return telemetry.known(telemetry.cpu_seconds(pids))


def gpu_status() -> str:
    """NVML on this node: "ok (N devices)" or "unknown (<reason>)" (:func:`aifactory.telemetry.gpu_status`)."""
    return telemetry.gpu_status()
