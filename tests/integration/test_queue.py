"""The tenant job queue on the session's `factory up` cluster (its dispatcher actor runs every second).

Jobs declare what they hold (``num_cpus``) and sleep: the queue plans with declarations, so a few seconds of
sleeping jobs fill the cluster as far as the queue is concerned, without loading the machine's two cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_factory

SLEEP = "python -c 'import time; time.sleep({s})'"


@pytest.fixture
def queue_home(ray_driver):
    """The session home with lanes for these tests: learning may fill the cluster; removed afterwards."""
    from aifactory.home import FactoryHome

    lanes = Path(ray_driver.home) / "lanes.yaml"
    lanes.write_text("lanes:\n"
                     "  factory: {priority: 100}\n"
                     "  learning: {priority: 10, max_share: 1.0, preemption: {preemptible: false}}\n")
    try:
        yield FactoryHome.from_env(ray_driver.home)
    finally:
        lanes.unlink(missing_ok=True)


def _free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def _wait_all(client, ids, timeout_s=120):
    return {i: client.wait(i, timeout_s=timeout_s, poll_s=0.25) for i in ids}


def test_factory_work_starts_ahead_of_queued_learning_work_and_the_queue_shows_why(ray_driver, queue_home):
    from aifactory.cost.ledger import Ledger
    from aifactory.jobs import Client
    from aifactory.queue.store import QueueStore
    from aifactory.workloads import read_record

    cluster = ray_driver
    learn = Client(address=cluster.dashboard_url, tenant="q-learn", home=queue_home)
    # More 1.5-CPU jobs than fit: the burst fills the cluster and the rest waits.
    fit = int(_free_cpus() // 1.5)
    assert fit >= 2, _free_cpus()
    burst = [learn.submit(SLEEP.format(s=8), num_cpus=1.5, entrypoint_num_cpus=0.25, lane="learning")
             for _ in range(fit + 3)]
    store = QueueStore.of(queue_home)
    states = [store.get(i).state for i in burst]
    started = [i for i in burst if store.get(i).state == "running"]
    behind = [i for i in burst if store.get(i).state == "queued"]
    assert len(started) >= fit and len(behind) >= 2 and states == sorted(states, key="running queued".index), states
    assert learn.get(behind[-1]).status == "QUEUED"
    extra = learn.submit(SLEEP.format(s=1), num_cpus=1.5, lane="learning")
    # The factory lane's job, through the CLI, queued after the learning work.
    out = run_factory("submit", "--tenant", "q-prod", "--lane", "factory", "--num-cpus", "1.5", "--",
                      "python", "-c", "import time; time.sleep(1)", home=cluster.home, env=cluster.env())
    prod = out.stdout.strip().splitlines()[-1]
    rows = json.loads(run_factory("queue", "--format", "json", home=cluster.home, env=cluster.env()).stdout)
    waiting = {r["id"]: r for r in rows if r["state"] == "queued"}
    assert waiting[prod]["position"] == 1 and waiting[prod]["lane"] == "factory", waiting
    assert "waiting for CPU" in waiting[prod]["reason"] and waiting[prod]["eta_s"] is not None
    assert {*behind, extra} <= set(waiting)
    # Cancel one queued learning entry: it never reaches Ray.
    cancelled = json.loads(run_factory("queue", "cancel", extra, "--format", "json", home=cluster.home,
                                       env=cluster.env()).stdout)
    assert cancelled["state"] == "cancelled" and learn.get(extra).status == "CANCELLED"
    finals = _wait_all(learn, [*burst, prod])
    assert {i: r.status for i, r in finals.items()} == dict.fromkeys([*burst, prod], "SUCCEEDED")
    entries = {i: store.get(i) for i in [*burst, prod]}
    # ordering: the factory job started before either learning job that was queued ahead of it
    assert entries[prod].started_at < min(entries[i].started_at for i in behind), {
        i: e.started_at for i, e in entries.items()}
    jobs = {j.submission_id for j in learn._jobs.list_jobs()}
    assert extra not in jobs and all(i in jobs for i in [*burst, prod])
    record = read_record(queue_home, prod)
    assert record.queued_at is not None and record.queue_wait_s > 0.5, record
    waits = [e for e in Ledger.of(queue_home).events(tenant="q-prod") if e["kind"] == "queue_wait"]
    assert len(waits) == 1 and waits[0]["count"] == pytest.approx(record.queue_wait_s, abs=0.01)
    health = json.loads(run_factory("status", "--format", "json", home=cluster.home).stdout)["queue_dispatcher"]
    assert health["status"] == "ok" and health["passes"] > 0, health


def test_the_factorys_own_actors_hold_no_cpu_so_a_whole_cluster_job_can_start(ray_driver, control_api):
    """The dispatcher, the meter and the control API are control plane: had they reserved even 0.05 CPU, a job declaring every
    CPU of the cluster would wait forever on an idle `factory up` head (benchmarks/queue_lanes found it)."""
    from ray.util.state import list_actors

    from aifactory.queue.dispatcher import DISPATCHER_NAME

    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    assert DISPATCHER_NAME in {a.name for a in actors}, sorted(a.name for a in actors)
    # the factory's named actors, and the control API's Serve replicas (control plane too)
    own = {f"{a.class_name}/{a.name}": a.required_resources for a in actors
           if (a.name or "").startswith("aifactory") or a.class_name.endswith(":ControlAPI")}
    assert any(k.split("/")[0].endswith(":ControlAPI") for k in own), sorted(a.class_name for a in actors)
    assert all(not r.get("CPU") and not r.get("GPU") for r in own.values()), own


def test_refusals_are_immediate_and_name_the_field(ray_driver, queue_home):
    from aifactory.exceptions import QueueRefused
    from aifactory.jobs import Client
    from aifactory.queue.store import QueueStore

    client = Client(address=ray_driver.dashboard_url, tenant="q-refused", home=queue_home)
    for kwargs, field in (({"lane": "nope"}, "lane"), ({"lane": "learning", "priority": 500}, "priority"),
                          ({"num_cpus": 1000}, "resources.CPU")):
        with pytest.raises(QueueRefused) as err:
            client.submit("python -c 1", **kwargs)
        assert err.value.field == field, err.value
    proc = run_factory("submit", "--tenant", "q-refused", "--lane", "nope", "--", "python", "-c", "1",
                       home=ray_driver.home, env=ray_driver.env(), check=False)
    assert proc.returncode == 1 and "field='lane'" in proc.stderr and "Traceback" not in proc.stderr
    assert QueueStore.of(queue_home).list(tenant="q-refused") == []


def test_a_dispatcher_killed_mid_dispatch_loses_nothing_and_runs_nothing_twice(ray_driver, queue_home):
    """A dispatcher died holding the lock: one entry claimed and submitted to Ray, one claimed only, the rest
    queued. The actor is killed (and restarted by Ray) again while it dispatches; every entry runs once."""
    import ray
    from aifactory.jobs import Client
    from aifactory.queue.dispatcher import DISPATCHER_NAME, NAMESPACE, pass_lock
    from aifactory.queue.door import enqueue
    from aifactory.queue.store import QueueStore
    from aifactory.tenancy import TenantRef, WorkloadKind
    from aifactory.workloads import Resources, Workload

    client = Client(address=ray_driver.dashboard_url, tenant="q-crash", home=queue_home)
    store = QueueStore.of(queue_home)
    wl = Workload(kind=WorkloadKind.OTHER, tenant=TenantRef(tenant="q-crash"), name="sleep", lane="learning",
                  resources=Resources(cpu=0.25))
    with pass_lock(queue_home, timeout_s=30) as got:  # this test is the dispatcher that dies
        assert got
        ids = [enqueue(queue_home, wl, payload={"job": {"entrypoint": SLEEP.format(s=1),
                                                        "metadata": {"tenant": "q-crash"}}},
                       actor="test").id for _ in range(6)]
        submitted, claimed_only = store.claim(ids[0]), store.claim(ids[1])
        client._jobs.submit_job(entrypoint=SLEEP.format(s=1), submission_id=submitted.submission_id,
                                metadata={"tenant": "q-crash"})
    actor = ray.get_actor(DISPATCHER_NAME, namespace=NAMESPACE)
    for _ in range(3):  # kill it while it reconciles and dispatches; Ray restarts it (max_restarts=-1)
        ray.kill(actor, no_restart=False)
        time.sleep(0.7)
    deadline = time.monotonic() + 90
    while not all(store.get(i).state == "succeeded" for i in ids):
        assert time.monotonic() < deadline, {i: (store.get(i).state, store.get(i).reason) for i in ids}
        time.sleep(0.5)
    jobs = [j for j in client._jobs.list_jobs() if (j.metadata or {}).get("tenant") == "q-crash"]
    assert sorted(j.submission_id for j in jobs) == sorted(ids)  # one Ray job per entry, no second attempt
    assert claimed_only.id in ids and all(store.get(i).attempts == 1 for i in ids)
    assert ray.get(ray.get_actor(DISPATCHER_NAME, namespace=NAMESPACE).status.remote(), timeout=30)["passes"] > 0
