"""The durable queue (:mod:`aifactory.queue.store`) and the dispatcher's pass over it, without Ray.

The job table here stands in for Ray's: it keeps jobs by submission id and refuses a second job with the same
id, as ``JobSubmissionClient.submit_job`` does; the real one is exercised by tests/integration/test_queue.py.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from types import SimpleNamespace

import pytest
from aifactory.home import FactoryHome
from aifactory.queue.dispatcher import dispatch_once
from aifactory.queue.door import enqueue
from aifactory.queue.store import QueueStore, submission_id
from aifactory.tenancy import TenantRef, WorkloadKind
from aifactory.workloads import Resources, Workload, read_record


class JobTable:
    """Ray's job table as the dispatcher uses it: submit (a duplicate submission id is refused), list, stop."""

    def __init__(self):
        self.jobs: dict[str, SimpleNamespace] = {}
        self.submits = 0
        self.lock = threading.Lock()

    def submit_job(self, *, entrypoint, submission_id, metadata=None, runtime_env=None, **kw):
        with self.lock:
            self.submits += 1
            if submission_id in self.jobs:
                raise RuntimeError(f"Job with submission_id {submission_id} already exists. Please use a different "
                                   "submission_id.")
            self.jobs[submission_id] = SimpleNamespace(submission_id=submission_id, job_id=f"0{len(self.jobs)}",
                                                       status="RUNNING", end_time=None, message="",
                                                       driver_exit_code=None, metadata=metadata, env=runtime_env)
        return submission_id

    def list_jobs(self):
        with self.lock:
            return list(self.jobs.values())

    def stop_job(self, sub_id):
        self.jobs[sub_id].status = "STOPPED"
        return True

    def end(self, sub_id, status="SUCCEEDED", exit_code=0):
        j = self.jobs[sub_id]
        j.status, j.end_time, j.driver_exit_code = status, time.time() * 1000, exit_code


class View:
    def __init__(self, cpu=4.0, used=0.0):
        self.cpu, self.used = cpu, used

    def read(self):
        return {"CPU": self.cpu}, {"CPU": self.used}


@pytest.fixture
def home(tmp_path):
    """A home whose lanes have no share caps (the caps are the policy's tests), learning preemptible at once."""
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    (home.root / "lanes.yaml").write_text(
        "lanes:\n  factory: {priority: 100}\n  learning: {priority: 10, preemption: {preemptible: true, grace_s: 0}}\n")
    return home


def _queue(home, tenant="a", cpu=1.0, lane="learning", kind=WorkloadKind.OTHER, **kw):
    wl = Workload(kind=kind, tenant=TenantRef(tenant=tenant), name="python x.py", lane=lane,
                  resources=Resources(cpu=cpu))
    return enqueue(home, wl, payload={"job": {"entrypoint": "python x.py", "metadata": {"tenant": tenant}}},
                   actor="test", capacity={"CPU": 4.0}, **kw)


def test_entries_survive_reopening_and_a_claim_is_taken_once(home):
    e = _queue(home)
    again = QueueStore.of(home)  # another process's view of the same file
    assert again.get(e.id).state == "queued" and again.get(e.id).resources == {"CPU": 1.0}
    first, second = again.claim(e.id), QueueStore.of(home).claim(e.id)
    assert first is not None and first.state == "dispatching" and first.submission_id == e.id
    assert second is None  # no double dispatch
    assert submission_id(e.id, 3) == f"{e.id}-a3"


def _claim_in_process(path, entry_id, out):
    out.put(QueueStore(path).claim(entry_id) is not None)


def test_concurrent_claims_from_processes_start_an_entry_once(home):
    e = _queue(home)
    out = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_claim_in_process, args=(str(QueueStore.of(home).path), e.id, out))
             for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    wins = [out.get(timeout=10) for _ in procs]
    assert wins.count(True) == 1, wins


def test_a_row_left_dispatching_is_reconciled_against_the_job_table(home):
    table = JobTable()
    submitted, lost = _queue(home), _queue(home)
    store = QueueStore.of(home)
    # A dispatcher claimed both, submitted the first to Ray, then died before marking either running.
    for e in (submitted, lost):
        store.claim(e.id)
    table.submit_job(entrypoint="python x.py", submission_id=submitted.id)
    report = dispatch_once(home, client=table, view=None)
    assert report.reconciled == {submitted.id: "running", lost.id: "queued"}
    assert store.get(submitted.id).state == "running" and store.get(lost.id).state == "queued"
    # The next pass starts the lost one, under its first attempt's id again; the other is not submitted twice.
    report = dispatch_once(home, client=table, view=View())
    assert report.started == [lost.id] and store.get(lost.id).submission_id == lost.id
    assert sorted(table.jobs) == sorted([submitted.id, lost.id]) and table.submits == 2


def test_two_dispatchers_at_once_submit_each_entry_once(home):
    table = JobTable()
    ids = [_queue(home, tenant=f"t{i % 3}", cpu=0.25).id for i in range(8)]
    threads = [threading.Thread(target=dispatch_once, args=(home,), kwargs={"client": table, "view": View()})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(table.jobs) == sorted(ids) and table.submits == len(ids)  # the lock: no duplicate attempt


def test_a_finished_job_ends_its_entry_and_record_with_the_queue_wait(home):
    from aifactory.cost.ledger import Ledger

    table = JobTable()
    e = _queue(home, cpu=2)
    blocked = _queue(home, cpu=4)
    dispatch_once(home, client=table, view=View())
    store = QueueStore.of(home)
    assert store.get(e.id).state == "running" and store.get(blocked.id).state == "queued"
    assert "waiting for CPU: needs 4, 2 free" in store.get(blocked.id).reason
    table.end(e.id)
    report = dispatch_once(home, client=table, view=View())
    assert report.finished == {e.id: "succeeded"} and report.started == [blocked.id]
    record = read_record(home, blocked.id)
    assert record.queued_at == pytest.approx(blocked.enqueued_at) and record.queue_wait_s > 0
    events = [ev for ev in Ledger.of(home).events(tenant="a") if ev["kind"] == "queue_wait"]
    assert len(events) == 2 and all(ev["count"] >= 0 for ev in events)
    assert read_record(home, e.id).status == "succeeded"


def test_a_preempted_job_is_stopped_after_its_grace_and_queued_again_for_a_second_attempt(home):
    from aifactory import audit

    table = JobTable()
    learn = _queue(home, cpu=4)
    dispatch_once(home, client=table, view=View())
    prod = _queue(home, tenant="prod", cpu=2, lane="factory")
    report = dispatch_once(home, client=table, view=View(used=4))
    assert report.preempted == [learn.id] and table.jobs[learn.id].status == "STOPPED"
    store = QueueStore.of(home)
    assert store.get(learn.id).state == "preempting" and store.get(prod.id).state == "queued"
    report = dispatch_once(home, client=table, view=View(used=0))
    assert report.requeued == [learn.id] and report.started == [prod.id]
    back = store.get(learn.id)
    assert back.state == "queued" and back.preemptions[0]["for"] == prod.id
    assert [e.target for e in audit.query(home, action="queue.preempt")] == [learn.id]
    assert read_record(home, learn.id).preemptions[0]["for"] == prod.id
    table.end(prod.id)
    dispatch_once(home, client=table, view=View())
    dispatch_once(home, client=table, view=View())
    assert store.get(learn.id).state == "running" and store.get(learn.id).submission_id == f"{learn.id}-a2"


def test_cancel_takes_a_queued_entry_out_and_refuses_a_running_one(home):
    from aifactory.exceptions import FactoryError
    from aifactory.queue.door import cancel

    table = JobTable()
    running, queued = _queue(home, cpu=4), _queue(home, cpu=4)
    dispatch_once(home, client=table, view=View())
    assert cancel(home, queued.id, actor="me").state == "cancelled"
    with pytest.raises(FactoryError, match="is running, not queued"):
        cancel(home, running.id, actor="me")
    table.end(running.id)
    dispatch_once(home, client=table, view=View())
    assert queued.id not in table.jobs


def test_train_and_bench_run_check_their_lane_before_anything_starts(home):
    import subprocess
    import sys
    from pathlib import Path

    from aifactory.exceptions import QueueRefused
    from aifactory.queue.door import resolve_lane

    (home.root / "lanes.yaml").write_text("lanes:\n  factory: {priority: 100}\n  learning: {priority: 10}\n"
                                          "  vip: {priority: 50, allowed_tenants: [b]}\ntenant_lanes: {a: learning}\n")
    assert resolve_lane(home, "a", None) == "learning" and resolve_lane(home, "b", "vip") == "vip"
    with pytest.raises(QueueRefused) as err:
        resolve_lane(home, "a", "vip")
    assert err.value.field == "lanes.vip.allowed_tenants"
    factory = str(Path(sys.executable).parent / "factory")
    # `factory bench run --lane` is checked by the same resolve_lane before its cluster starts
    proc = subprocess.run([factory, "--home", str(home.root), "train", "--recipe", "tiny", "--tenant", "a",
                           "--lane", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "QueueRefused(field='lane', value='nope'" in proc.stderr, proc.stderr
