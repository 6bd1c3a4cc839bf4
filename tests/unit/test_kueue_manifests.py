"""Kueue for RayJobs that bring their own Ray cluster (cluster/kueue/, cluster/kuberay/ray-job.*-lane.yaml).

Each object alone is validated against the Kueue CRDs in ``../shared/kueue-crds/`` by
``test_cluster_manifests.py::test_manifest_is_valid`` (every file under cluster/ is a case there). This module
checks what no schema can: that the objects fit together as Kueue needs them to, and as the factory means them.

- Flavors are the node pools: one ResourceFlavor per pool of ray-cluster.factory.yaml and of the price book, by
  name, with the taints the pool's pods tolerate.
- A ClusterQueue and a WorkloadPriorityClass per lane (``factory``, ``learning``: the in-cluster queue's lanes),
  in one Cohort that exists; every flavor a queue names exists and lists exactly the queue's covered resources;
  quotas stay within each pool's node limit. ``factory`` is guaranteed (never borrows, never preempts its own
  work, reclaims what it lent) and ranks higher; ``learning`` is capped (a borrowing limit on every resource)
  and never preempts other queues' work.
- LocalQueues live in tenant namespaces that exist and that their ClusterQueue selects, and name a ClusterQueue
  that exists (the one of the same name: the lane).
- Every RayJob with a cluster of its own is queued: its ``kueue.x-k8s.io/queue-name`` names a LocalQueue of its
  namespace, its priority class exists and is its lane's; it passes Kueue's RayJob webhook (suspended, deletes
  its cluster when done, no autoscaling, <= 7 worker groups); each pod set (head, worker groups, submitter) asks
  only for resources its ClusterQueue covers, is pinned to a pool whose flavor the queue has and whose taints it
  tolerates, and the whole job fits the most that queue can ever hold (else Kueue would never admit it).

Each check is also run on deliberately broken copies (``BROKEN_SETS``, ``BROKEN_OBJECTS``), so none can
silently pass.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit._crd import REPO, load_yaml_all, parse_quantity
from tests.unit.test_cluster_manifests import (
    CLUSTER,
    POOL_LABEL,
    TENANT_LABEL,
    check_manifest,
)

KUEUE = CLUSTER / "kueue"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
LANES = {"factory", "learning"}
PRICEBOOK = REPO / "platform/aifactory/cost/pricebook.default.yaml"
# Kueue's RayJob webhook (pkg/controller/jobs/raycluster/raycluster_webhook.go): 8 pod sets at most, the
# head's included; KubeRay's default submitter pod when a RayJob in K8sJobMode names none
# (ray-operator/controllers/ray/common/job.go, mirrored by Kueue's rayjob_controller.go).
MAX_WORKER_GROUPS = 7
DEFAULT_SUBMITTER = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}

Docs = list[tuple[str, dict]]  # (file[index], document)


def cluster_docs() -> Docs:
    """Every Kubernetes object under cluster/ (launcher configs are not)."""
    docs = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for i, doc in enumerate(load_yaml_all(path.read_text())):
            if isinstance(doc, dict) and "kind" in doc:
                docs.append((f"{path.relative_to(CLUSTER).as_posix()}[{i}]", doc))
    return docs


def _name(doc: dict) -> str:
    return doc["metadata"]["name"]


def _ns(doc: dict) -> str | None:
    return doc["metadata"].get("namespace")


def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    """Kubernetes' rule (k8s.io/api/core/v1 Toleration.ToleratesTaint)."""
    for t in tolerations or []:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        if t.get("key") and t["key"] != taint["key"]:
            continue
        if t.get("operator", "Equal") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _pod_requests(pod_spec: dict) -> dict[str, Fraction]:
    """What a pod asks the scheduler for: containers' requests (a limit alone is also the request)."""
    total: dict[str, Fraction] = defaultdict(Fraction)
    for c in pod_spec.get("containers", []):
        res = c.get("resources") or {}
        for name, amount in {**(res.get("limits") or {}), **(res.get("requests") or {})}.items():
            total[name] += parse_quantity(amount)
    return dict(total)


def _pod_sets(job: dict) -> list[tuple[str, int, dict]]:
    """(name, pod count, pod spec) of each pod set Kueue makes of a RayJob: head, worker groups, submitter."""
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    sets = [("head", 1, cluster["headGroupSpec"]["template"]["spec"])]
    for g in cluster.get("workerGroupSpecs", []):
        count = g.get("replicas", g.get("minReplicas", 0)) * g.get("numOfHosts", 1)
        sets.append((g["groupName"], count, g["template"]["spec"]))
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        template = spec.get("submitterPodTemplate") or {"spec": {"containers": [{"resources": DEFAULT_SUBMITTER}]}}
        sets.append(("submitter", 1, template["spec"]))
    return sets


def _factory_pools() -> dict[str, dict]:
    """Pool -> its group in ray-cluster.factory.yaml (head included)."""
    (cluster,) = load_yaml_all((CLUSTER / "kuberay/ray-cluster.factory.yaml").read_text())
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return {g["labels"][POOL_LABEL]: g for g in groups}


def check_kueue_set(docs: Docs) -> None:
    """Every way the Kueue objects and the RayJobs under cluster/ fail to fit together; raises once with all."""
    problems: list[str] = []
    by_kind: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for where, doc in docs:
        by_kind[doc["kind"]].append((where, doc))
    flavors = {_name(d): (w, d) for w, d in by_kind["ResourceFlavor"]}
    cohorts = {_name(d) for _, d in by_kind["Cohort"]}
    queues = {_name(d): (w, d) for w, d in by_kind["ClusterQueue"]}
    priorities = {_name(d): d for _, d in by_kind["WorkloadPriorityClass"]}
    namespaces = {_name(d): d for _, d in by_kind["Namespace"]}
    local_queues = {(_ns(d), _name(d)): (w, d) for w, d in by_kind["LocalQueue"]}

    # --- flavors are the pools
    pools = _factory_pools()
    book = yaml.safe_load(PRICEBOOK.read_text())["pools"]
    for name, (where, rf) in flavors.items():
        labels = rf["spec"].get("nodeLabels") or {}
        if labels.get(POOL_LABEL) != name:
            problems.append(f"{where}: ResourceFlavor {name!r} must select its pool's nodes "
                            f"(nodeLabels.{POOL_LABEL}: {name}), got {labels.get(POOL_LABEL)!r}")
        if name not in pools or name not in book:
            problems.append(f"{where}: ResourceFlavor {name!r} is not a pool of ray-cluster.factory.yaml "
                            f"({sorted(pools)}) and the price book ({sorted(book)})")
            continue
        spot = book[name].get("pricing_class") == "spot"
        if (labels.get("karpenter.sh/capacity-type") == "spot") != spot:
            problems.append(f"{where}: ResourceFlavor {name!r}: karpenter.sh/capacity-type "
                            f"{labels.get('karpenter.sh/capacity-type')!r} disagrees with the price book's "
                            f"pricing_class {book[name].get('pricing_class')!r}")
        taints = {t["key"] for t in rf["spec"].get("nodeTaints") or []}
        tolerated = {t["key"] for t in pools[name]["template"]["spec"].get("tolerations") or [] if t.get("key")}
        if taints != tolerated:
            problems.append(f"{where}: ResourceFlavor {name!r}: nodeTaints {sorted(taints)} differ from the taints "
                            f"that pool's pods tolerate in ray-cluster.factory.yaml ({sorted(tolerated)})")
    for pool in sorted(set(pools) - set(flavors)):
        problems.append(f"pool {pool!r} of ray-cluster.factory.yaml has no ResourceFlavor in cluster/kueue/")

    # --- a ClusterQueue and a WorkloadPriorityClass per lane, in one Cohort
    if set(queues) != LANES:
        problems.append(f"ClusterQueues {sorted(queues)}: want one per lane, {sorted(LANES)}")
    if set(priorities) != LANES:
        problems.append(f"WorkloadPriorityClasses {sorted(priorities)}: want one per lane, {sorted(LANES)}")
    if {"factory", "learning"} <= set(priorities) and not priorities["factory"]["value"] > priorities["learning"]["value"]:
        problems.append(f"WorkloadPriorityClass factory ({priorities['factory']['value']}) must rank above "
                        f"learning ({priorities['learning']['value']})")
    for _, c in by_kind["Cohort"]:
        parent = c.get("spec", {}).get("parentName")
        if parent and parent not in cohorts:
            problems.append(f"Cohort {_name(c)!r}: parentName {parent!r} names no Cohort")
    used_cohorts = {d["spec"].get("cohortName") for _, d in queues.values()}
    if len(used_cohorts) != 1:
        problems.append(f"the lanes' ClusterQueues must share one Cohort, got {sorted(map(str, used_cohorts))}")
    capacity_used: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
    for name, (where, cq) in queues.items():
        spec = cq["spec"]
        if spec.get("cohortName") not in cohorts:
            problems.append(f"{where}: ClusterQueue {name!r}: cohortName {spec.get('cohortName')!r} names no Cohort "
                            f"(Cohorts: {sorted(cohorts)})")
        preemption = spec.get("preemption") or {}
        for group in spec.get("resourceGroups", []):
            covered = group["coveredResources"]
            for flavor in group["flavors"]:
                fwhere = f"{where}: ClusterQueue {name!r} flavor {flavor['name']!r}"
                if flavor["name"] not in flavors:
                    problems.append(f"{fwhere}: no ResourceFlavor {flavor['name']!r} (flavors: {sorted(flavors)})")
                listed = [r["name"] for r in flavor["resources"]]
                if listed != covered:
                    problems.append(f"{fwhere}: resources {listed} must be the coveredResources {covered}, in order")
                for r in flavor["resources"]:
                    capacity_used[(flavor["name"], r["name"])] += parse_quantity(r["nominalQuota"])
                    borrowing = r.get("borrowingLimit")
                    if name == "factory" and (borrowing is None or parse_quantity(borrowing) != 0):
                        problems.append(f"{fwhere}: {r['name']}: the factory lane's quota is guaranteed only if it "
                                        f"never borrows (borrowingLimit: 0), got {borrowing!r}")
                    if name == "learning" and borrowing is None:
                        problems.append(f"{fwhere}: {r['name']}: the learning lane is capped: set a borrowingLimit")
        if name == "factory":
            if preemption.get("withinClusterQueue", "Never") != "Never":
                problems.append(f"{where}: ClusterQueue factory: preemption.withinClusterQueue must be Never "
                                f"(factory work is never preempted), got {preemption['withinClusterQueue']!r}")
            if preemption.get("reclaimWithinCohort", "Never") == "Never":
                problems.append(f"{where}: ClusterQueue factory: preemption.reclaimWithinCohort must not be Never: "
                                "factory takes back the quota learning borrowed")
        if name == "learning" and (preemption.get("borrowWithinCohort") or {}).get("policy", "Never") != "Never":
            problems.append(f"{where}: ClusterQueue learning: preemption.borrowWithinCohort.policy must be Never "
                            "(learning never preempts other lanes' work to borrow)")
    for (flavor, resource), total in sorted(capacity_used.items()):
        group = pools.get(flavor)
        if group is None or "maxReplicas" not in group:
            continue  # the head group has no node limit
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cap = group["maxReplicas"] * parse_quantity(limits.get(resource, 0))
        if total > cap:
            problems.append(f"ClusterQueues' nominalQuota of {resource} in flavor {flavor!r} add up to {float(total):g}, "
                            f"more than the pool's capacity {float(cap):g} (maxReplicas {group['maxReplicas']} x "
                            f"{limits.get(resource, 0)} in ray-cluster.factory.yaml)")

    # --- LocalQueues: per tenant namespace, naming a ClusterQueue that selects it
    for (ns, name), (where, lq) in local_queues.items():
        cq_name = lq["spec"]["clusterQueue"]
        if ns not in namespaces:
            problems.append(f"{where}: LocalQueue {ns}/{name}: no tenant Namespace {ns!r} in cluster/kueue/")
        if cq_name not in queues:
            problems.append(f"{where}: LocalQueue {ns}/{name} names ClusterQueue {cq_name!r}, which does not exist "
                            f"(ClusterQueues: {sorted(queues)})")
            continue
        if name != cq_name:
            problems.append(f"{where}: LocalQueue {ns}/{name} feeds ClusterQueue {cq_name!r}: name it after its lane")
        labels = (namespaces.get(ns) or {}).get("metadata", {}).get("labels") or {}
        if ns in namespaces and not _selects(queues[cq_name][1]["spec"].get("namespaceSelector"), labels):
            problems.append(f"{where}: ClusterQueue {cq_name!r}'s namespaceSelector does not select namespace {ns!r} "
                            f"(labels {labels}): Kueue would leave LocalQueue {ns}/{name} inactive")
    for ns in sorted(set(namespaces) - {ns for ns, _ in local_queues}):
        problems.append(f"tenant Namespace {ns!r} has no LocalQueue")

    # --- RayJobs
    queued_lanes = set()
    for where, job in by_kind["RayJob"]:
        problems += _check_rayjob(where, job, local_queues, queues, priorities, flavors, namespaces)
        lq = local_queues.get((_ns(job), (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)))
        if lq:
            queued_lanes.add(lq[1]["spec"]["clusterQueue"])
    for lane in sorted(LANES - queued_lanes):
        problems.append(f"no RayJob under cluster/kuberay/ is queued in the {lane!r} lane (a manifest per lane "
                        "shows how, and keeps these checks exercised)")
    assert not problems, "Kueue manifests do not fit together:\n  " + "\n  ".join(problems)


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector on ``labels`` (nil selects nothing, {} everything, as for a ClusterQueue)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _check_rayjob(where, job, local_queues, queues, priorities, flavors, namespaces) -> list[str]:
    meta, spec = job["metadata"], job["spec"]
    labels = meta.get("labels") or {}
    name = f"RayJob {_name(job)!r}"
    if QUEUE_LABEL not in labels:
        if spec.get("rayClusterSpec"):
            return [(f"{where}: {name} brings its own Ray cluster but is not queued: label it {QUEUE_LABEL}: <lane> "
                     "(and create it in its tenant's namespace)")]
        return []
    if spec.get("clusterSelector"):
        return [(f"{where}: {name} runs on an existing cluster (clusterSelector), which Kueue does not queue: "
                 f"drop the {QUEUE_LABEL} label (the factory's own queue is the door to the shared cluster)")]
    problems = []
    # Kueue's RayJob webhook and what admission needs
    if spec.get("suspend") is not True:
        problems.append(f"{where}: {name}: a queued RayJob is created with suspend: true (Kueue unsuspends it on admission)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: {name}: Kueue requires shutdownAfterJobFinishes: true (the cluster holds quota)")
    cluster = spec.get("rayClusterSpec") or {}
    if cluster.get("enableInTreeAutoscaling"):
        problems.append(f"{where}: {name}: Kueue admits a fixed-size cluster: enableInTreeAutoscaling must be off")
    workers = cluster.get("workerGroupSpecs", [])
    if len(workers) > MAX_WORKER_GROUPS:
        problems.append(f"{where}: {name}: {len(workers)} worker groups; Kueue takes at most {MAX_WORKER_GROUPS}")
    for g in workers:
        if g["groupName"] == "head":
            problems.append(f"{where}: {name}: worker group name 'head' is reserved by Kueue for the head group")
        if not g.get("replicas", 0) == g.get("minReplicas", 0) == g.get("maxReplicas", 0):
            problems.append(f"{where}: {name}: worker group {g['groupName']!r}: a fixed size (replicas = minReplicas = "
                            "maxReplicas) is what Kueue reserves quota for")
    ns, queue = meta.get("namespace"), labels[QUEUE_LABEL]
    if (ns, queue) not in local_queues:
        have = sorted(f"{n}/{q}" for n, q in local_queues)
        return problems + [(f"{where}: {name}: {QUEUE_LABEL}={queue!r} in namespace {ns!r} names LocalQueue {ns}/{queue}, "
                            f"which does not exist (LocalQueues: {have})")]
    lane = local_queues[(ns, queue)][1]["spec"]["clusterQueue"]
    if lane not in queues:
        return problems  # the missing ClusterQueue is reported with the LocalQueue
    cq = queues[lane][1]["spec"]
    priority = labels.get(PRIORITY_LABEL)
    if priority not in priorities:
        problems.append(f"{where}: {name}: {PRIORITY_LABEL}={priority!r} names no WorkloadPriorityClass "
                        f"({sorted(priorities)})")
    elif priority != lane:
        problems.append(f"{where}: {name} is queued in the {lane!r} lane at the {priority!r} lane's priority: "
                        f"set {PRIORITY_LABEL}: {lane}")
    tenant = ((namespaces.get(ns) or {}).get("metadata", {}).get("labels") or {}).get(TENANT_LABEL)
    job_meta = spec.get("metadata") or {}
    if job_meta.get("tenant") != tenant or labels.get(TENANT_LABEL) != tenant:
        problems.append(f"{where}: {name} in namespace {ns!r} (tenant {tenant!r}) says tenant "
                        f"{job_meta.get('tenant')!r} (spec.metadata) / {labels.get(TENANT_LABEL)!r} (label)")
    if job_meta.get("lane") != lane:
        problems.append(f"{where}: {name}: spec.metadata.lane {job_meta.get('lane')!r} must be its queue's lane {lane!r}")
    # Pod sets against the ClusterQueue's flavors and quotas
    covered, quota = set(), {}
    for group in cq.get("resourceGroups", []):
        covered |= set(group["coveredResources"])
        for f in group["flavors"]:
            quota[f["name"]] = {r["name"]: r for r in f["resources"]}
    others = [q[1]["spec"] for n, q in queues.items() if n != lane and q[1]["spec"].get("cohortName") == cq.get("cohortName")]
    need: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
    for set_name, count, pod in _pod_sets(job):
        pwhere = f"{where}: {name} pod set {set_name!r}"
        requests = _pod_requests(pod)
        for resource in sorted(set(requests) - covered):
            problems.append(f"{pwhere} requests {resource!r}, which ClusterQueue {lane!r} does not cover "
                            f"({sorted(covered)}): Kueue would never admit it")
        pool = (pod.get("nodeSelector") or {}).get(POOL_LABEL)
        if pool is None:
            problems.append(f"{pwhere}: pin it to a pool (nodeSelector {POOL_LABEL}: <pool>) so Kueue charges the "
                            "pool's flavor that its Ray labels and the cost collector say")
            continue
        if pool not in quota:
            problems.append(f"{pwhere}: pool {pool!r} is not a flavor of ClusterQueue {lane!r} ({sorted(quota)})")
            continue
        rf = flavors.get(pool, (None, {"spec": {}}))[1]["spec"]
        for key, value in (rf.get("nodeLabels") or {}).items():
            if key in (pod.get("nodeSelector") or {}) and pod["nodeSelector"][key] != value:
                problems.append(f"{pwhere}: nodeSelector {key}={pod['nodeSelector'][key]!r} contradicts flavor "
                                f"{pool!r}'s nodeLabels ({key}={value!r})")
        for taint in rf.get("nodeTaints") or []:
            if not _tolerates(pod.get("tolerations"), taint):
                problems.append(f"{pwhere}: does not tolerate the taint {taint['key']}:{taint['effect']} of flavor {pool!r}; "
                                "Kueue would not assign it that flavor")
        for resource, amount in requests.items():
            need[(pool, resource)] += count * amount
    for (pool, resource), amount in sorted(need.items()):
        r = quota[pool].get(resource)
        if r is None:
            continue  # reported as not covered
        nominal = parse_quantity(r["nominalQuota"])
        if r.get("borrowingLimit") is not None:
            borrowable = parse_quantity(r["borrowingLimit"])
        else:  # as much as the rest of the cohort has
            borrowable = sum((parse_quantity(res["nominalQuota"]) for o in others for g in o.get("resourceGroups", [])
                              for f in g["flavors"] if f["name"] == pool for res in f["resources"] if res["name"] == resource),
                             Fraction(0))
        if amount > nominal + borrowable:
            problems.append(f"{where}: {name} needs {float(amount):g} {resource} of flavor {pool!r}, more than ClusterQueue "
                            f"{lane!r} can ever hold (nominalQuota {r['nominalQuota']} + {float(borrowable):g} borrowable): "
                            "Kueue would never admit it")
    return problems


# --------------------------------------------------------------------------------------------------


def test_kueue_manifests_are_shipped():
    names = {p.name for p in KUEUE.glob("*.yaml")}
    assert {"flavors.yaml", "lanes.yaml", "tenants.yaml"} <= names
    kinds = {d["kind"] for _, d in cluster_docs()}
    assert {"ResourceFlavor", "Cohort", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass", "Namespace"} <= kinds


def test_kueue_manifests_fit_together():
    check_kueue_set(cluster_docs())


def test_lanes_match_the_in_cluster_queue():
    """Kueue's lanes are the factory queue's lanes: same names, same order of priority, same preemptibility."""
    from aifactory.workloads import DEFAULT_LANE

    docs = cluster_docs()
    queues = {_name(d) for _, d in docs if d["kind"] == "ClusterQueue"}
    assert DEFAULT_LANE in queues
    lanes_mod = pytest.importorskip("aifactory.queue.lanes", reason="needs the in-cluster queue's lanes (aifactory.queue)")
    lanes = lanes_mod.default_lanes()
    assert set(lanes) == queues
    value = {_name(d): d["value"] for _, d in docs if d["kind"] == "WorkloadPriorityClass"}
    assert sorted(lanes, key=lambda n: lanes[n].priority) == sorted(value, key=value.get)
    preemptible = {n for n, lane in lanes.items() if lane.preemption.preemptible}
    assert preemptible == {"learning"}


# --------------------------------------------------------------------------------------------------
# The checks fail on broken copies


def _find(docs: Docs, kind: str, name: str, namespace: str | None = None) -> dict:
    (doc,) = [d for _, d in docs if d["kind"] == kind and _name(d) == name and (namespace is None or _ns(d) == namespace)]
    return doc


def _drop(kind: str, name: str, namespace: str | None = None) -> Callable[[Docs], Docs]:
    def mutate(docs: Docs) -> Docs:
        doomed = _find(docs, kind, name, namespace)
        return [(w, d) for w, d in docs if d is not doomed]

    return mutate


def _edit(kind: str, name: str, change: Callable[[dict], Any], namespace: str | None = None) -> Callable[[Docs], Docs]:
    def mutate(docs: Docs) -> Docs:
        change(_find(docs, kind, name, namespace))
        return docs

    return mutate


def _cq_resource(doc: dict, flavor: str, resource: str) -> dict:
    (f,) = [f for g in doc["spec"]["resourceGroups"] for f in g["flavors"] if f["name"] == flavor]
    (r,) = [r for r in f["resources"] if r["name"] == resource]
    return r


def _worker(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _factory_job(change: Callable[[dict], Any]) -> Callable[[Docs], Docs]:
    return _edit("RayJob", "aifactory-train-search", change, "search")


def _learning_job(change: Callable[[dict], Any]) -> Callable[[Docs], Docs]:
    return _edit("RayJob", "aifactory-train-research", change, "research")


# case -> (mutation of the list of every object under cluster/, a fragment the error must name)
BROKEN_SETS: dict[str, tuple[Callable[[Docs], Docs], str]] = {
    "local-queue-missing": (_drop("LocalQueue", "learning", "research"), "names LocalQueue research/learning, which does not exist"),
    "local-queue-names-no-cluster-queue": (
        _edit("LocalQueue", "factory", lambda d: d["spec"].update(clusterQueue="factroy"), "search"),
        "names ClusterQueue 'factroy', which does not exist",
    ),
    "local-queue-without-namespace-object": (_drop("Namespace", "research"), "no tenant Namespace 'research'"),
    "namespace-not-selected": (
        _edit("ClusterQueue", "learning",
              lambda d: d["spec"].update(namespaceSelector={"matchLabels": {"aifactory.io/tenant": "nobody"}})),
        "namespaceSelector does not select namespace",
    ),
    "flavor-missing": (_drop("ResourceFlavor", "data-cpu"), "no ResourceFlavor 'data-cpu'"),
    "flavor-not-a-pool": (
        _edit("ResourceFlavor", "inference-asic", lambda d: (d["metadata"].update(name="gpu-h200"),
                                                           d["spec"]["nodeLabels"].update({POOL_LABEL: "gpu-h200"}))),
        "'gpu-h200' is not a pool",
    ),
    "flavor-taint-not-the-pools": (
        _edit("ResourceFlavor", "train-gpu-spot", lambda d: d["spec"]["nodeTaints"].pop()),
        "differ from the taints that pool's pods tolerate",
    ),
    "flavor-capacity-type-wrong": (
        _edit("ResourceFlavor", "train-gpu-spot", lambda d: d["spec"]["nodeLabels"].update({"karpenter.sh/capacity-type": "on-demand"})),
        "disagrees with the price book",
    ),
    "cohort-missing": (_edit("ClusterQueue", "learning", lambda d: d["spec"].update(cohortName="other")),
                       "cohortName 'other' names no Cohort"),
    "flavor-resources-not-covered": (
        _edit("ClusterQueue", "factory", lambda d: _cq_resource(d, "head", "nvidia.com/gpu").update(name="example.com/gpu")),
        "must be the coveredResources",
    ),
    "factory-borrows": (
        _edit("ClusterQueue", "factory", lambda d: _cq_resource(d, "train-gpu-reserved", "nvidia.com/gpu").pop("borrowingLimit")),
        "never borrows (borrowingLimit: 0)",
    ),
    "factory-preempts-itself": (
        _edit("ClusterQueue", "factory", lambda d: d["spec"]["preemption"].update(withinClusterQueue="LowerPriority")),
        "withinClusterQueue must be Never",
    ),
    "factory-cannot-reclaim": (
        _edit("ClusterQueue", "factory", lambda d: d["spec"]["preemption"].update(reclaimWithinCohort="Never")),
        "reclaimWithinCohort must not be Never",
    ),
    "learning-uncapped": (
        _edit("ClusterQueue", "learning", lambda d: _cq_resource(d, "train-gpu-reserved", "nvidia.com/gpu").pop("borrowingLimit")),
        "the learning lane is capped",
    ),
    "learning-preempts-to-borrow": (
        _edit("ClusterQueue", "learning", lambda d: d["spec"]["preemption"].update(
            reclaimWithinCohort="Any", borrowWithinCohort={"policy": "LowerPriority"})),
        "borrowWithinCohort.policy must be Never",
    ),
    "priorities-inverted": (_edit("WorkloadPriorityClass", "learning", lambda d: d.update(value=1000)), "must rank above"),
    "quota-over-pool-capacity": (
        _edit("ClusterQueue", "learning", lambda d: _cq_resource(d, "train-gpu-spot", "nvidia.com/gpu").update(nominalQuota=72)),
        "more than the pool's capacity",
    ),
    "job-queue-missing-in-its-namespace": (
        _factory_job(lambda d: d["metadata"].update(namespace="default")),
        "names LocalQueue default/factory, which does not exist",
    ),
    "job-priority-class-missing": (
        _factory_job(lambda d: d["metadata"]["labels"].update({PRIORITY_LABEL: "urgent"})),
        "'urgent' names no WorkloadPriorityClass",
    ),
    "job-priority-of-another-lane": (
        _learning_job(lambda d: d["metadata"]["labels"].update({PRIORITY_LABEL: "factory"})),
        "at the 'factory' lane's priority",
    ),
    "job-not-queued": (_factory_job(lambda d: d["metadata"]["labels"].pop(QUEUE_LABEL)), "is not queued"),
    "job-tenant-not-its-namespace": (
        _learning_job(lambda d: d["spec"]["metadata"].update(tenant="search")), "says tenant 'search'",
    ),
    "job-not-suspended": (_factory_job(lambda d: d["spec"].update(suspend=False)), "suspend: true"),
    "job-keeps-its-cluster": (_factory_job(lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),
                              "shutdownAfterJobFinishes"),
    "job-autoscales": (_factory_job(lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=True)),
                       "enableInTreeAutoscaling must be off"),
    "job-on-existing-cluster": (
        _factory_job(lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "aifactory"})),
        "which Kueue does not queue",
    ),
    "job-uncovered-resource": (
        _learning_job(lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"example.com/fpga": 1})),
        "requests 'example.com/fpga'",
    ),
    "job-pool-not-in-its-queue": (
        _factory_job(lambda d: _worker(d)["template"]["spec"]["nodeSelector"].update({POOL_LABEL: "train-gpu-spot"})),
        "pool 'train-gpu-spot' is not a flavor of ClusterQueue 'factory'",
    ),
    "job-unpinned": (_factory_job(lambda d: _worker(d)["template"]["spec"].pop("nodeSelector")), "pin it to a pool"),
    "job-intolerant-of-spot": (
        _learning_job(lambda d: _worker(d)["template"]["spec"]["tolerations"].pop()),
        "does not tolerate the taint aifactory.io/spot:NoSchedule of flavor 'train-gpu-spot'",
    ),
    "job-larger-than-its-queue": (
        _factory_job(lambda d: _worker(d).update(replicas=3, minReplicas=3, maxReplicas=3)),
        "needs 24 nvidia.com/gpu of flavor 'train-gpu-reserved', more than ClusterQueue 'factory' can ever hold",
    ),
    "job-not-fixed-size": (_factory_job(lambda d: _worker(d).update(maxReplicas=2)), "a fixed size"),
    "lane-without-a-job": (_drop("RayJob", "aifactory-train-research", "research"), "queued in the 'learning' lane"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SETS))
def test_check_kueue_set_rejects_a_broken_copy(case):
    mutate, message = BROKEN_SETS[case]
    docs = copy.deepcopy(cluster_docs())
    check_kueue_set(copy.deepcopy(docs))  # the untouched set passes...
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_kueue_set(mutate(docs))  # ...and this one change is what fails it


# case -> (file, the object's kind and name, the change, a fragment the error must name). Run through
# check_manifest (the CRD schemas and their CEL rules): these need ../shared/kueue-crds/.
BROKEN_OBJECTS: dict[str, tuple[str, tuple[str, str], Callable[[dict], Any], str]] = {
    "typo-in-cluster-queue": (
        "lanes.yaml", ("ClusterQueue", "factory"), lambda d: d["spec"].update(resourceGroup=d["spec"].pop("resourceGroups")),
        "'resourceGroup' was unexpected",
    ),
    "typo-in-local-queue": (
        "tenants.yaml", ("LocalQueue", "factory"), lambda d: d["spec"].update(clusterQueues="factory"),
        "'clusterQueues' was unexpected",
    ),
    "bad-preemption-policy": (
        "lanes.yaml", ("ClusterQueue", "learning"), lambda d: d["spec"]["preemption"].update(withinClusterQueue="Sometimes"),
        "'Sometimes' is not one of",
    ),
    "bad-quantity": (
        "lanes.yaml", ("ClusterQueue", "factory"),
        lambda d: _cq_resource(d, "head", "memory").update(nominalQuota="lots"), "nominalQuota",
    ),
    "priority-not-a-number": ("lanes.yaml", ("WorkloadPriorityClass", "factory"), lambda d: d.update(value="high"),
                              "'high' is not of type 'integer'"),
    "cel-borrowing-without-cohort": (
        "lanes.yaml", ("ClusterQueue", "learning"), lambda d: d["spec"].pop("cohortName"),
        "borrowingLimit must be nil when cohort is empty",
    ),
    "cel-resources-fewer-than-covered": (
        "lanes.yaml", ("ClusterQueue", "factory"), lambda d: d["spec"]["resourceGroups"][0]["flavors"][0]["resources"].pop(),
        "flavors must have the same number of resources as the coveredResources",
    ),
    "cel-reclaim-never-but-borrow-preempts": (
        "lanes.yaml", ("ClusterQueue", "learning"),
        lambda d: d["spec"]["preemption"].update(borrowWithinCohort={"policy": "LowerPriority"}),
        "reclaimWithinCohort=Never and borrowWithinCohort.Policy!=Never",
    ),
    "cel-bad-taint-effect": (
        "flavors.yaml", ("ResourceFlavor", "train-gpu-spot"), lambda d: d["spec"]["nodeTaints"][0].update(effect="NoWay"),
        "supported taint effect values",
    ),
    "deprecated-api-version": (
        "flavors.yaml", ("ResourceFlavor", "head"), lambda d: d.update(apiVersion="kueue.x-k8s.io/v1beta1"), "is deprecated",
    ),
    "local-queue-without-namespace": (
        "tenants.yaml", ("LocalQueue", "learning"), lambda d: d["metadata"].pop("namespace"), "names its tenant's namespace",
    ),
    "cluster-scoped-with-namespace": (
        "lanes.yaml", ("Cohort", "aifactory"), lambda d: d["metadata"].update(namespace="search"), "cluster-scoped",
    ),
    "namespace-not-labelled-with-its-tenant": (
        "tenants.yaml", ("Namespace", "search"), lambda d: d["metadata"]["labels"].update({TENANT_LABEL: "research"}),
        "labelled aifactory.io/tenant='search'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_OBJECTS))
def test_check_manifest_rejects_a_broken_kueue_object(case, tmp_path: Path):
    rel, (kind, name), change, message = BROKEN_OBJECTS[case]
    docs = load_yaml_all((KUEUE / rel).read_text())
    target = tmp_path / rel
    target.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    assert check_manifest(target) == len(docs)  # the untouched copy passes
    broken = copy.deepcopy(docs)
    (doc,) = [d for d in broken if d["kind"] == kind and d["metadata"]["name"] == name][:1]
    change(doc)
    target.write_text(yaml.safe_dump_all(broken, sort_keys=False))
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_manifest(target)
