"""Tasks that start and end between two samples: metered from the state API's finished tasks, exactly once."""

from types import SimpleNamespace

import pytest

from aifactory.cost.attribution import CapacityPoint, Tracker, attribute
from aifactory.cost.sampler import resource_keys, task_holdings
from aifactory.tenancy import JobTags

CAPACITY = {("cpu", "cpu"): 4.0}
SAMPLE_S, WINDOW_S = 10.0, 60.0


def _task(i: int, start: float, end: float | None, *, state: str = "FINISHED", job: str = "job-d", cpus=1.0):
    return SimpleNamespace(
        task_id=f"t{i}", attempt_number=0, type="NORMAL_TASK", state=state, placement_group_id=None,
        start_time_ms=None if start is None else start * 1000.0, end_time_ms=None if end is None else end * 1000.0,
        required_resources={"CPU": cpus}, node_id="n1", job_id=job, worker_pid=100 + i,
    )


def _keys(res, node_id):
    return resource_keys(res, accelerator="unknown-gpu", asic_sku="unknown-asic")


def _tags(job_id):
    return JobTags(tenant="delta", project="burst") if job_id == "job-d" else JobTags()


def _state_api(tasks, t):
    """What the state API answers at ``t``: running tasks, and every task that finished by then."""
    out = []
    for task in tasks:
        if task.start_time_ms / 1000.0 > t:
            continue
        if task.end_time_ms / 1000.0 > t:
            out.append(SimpleNamespace(**{**vars(task), "state": "RUNNING", "end_time_ms": None}))
        else:
            out.append(task)
    return out


def _run_collector(tasks, *, use_finished: bool, until: float = 300.0):
    """The collector's loop (CollectorCore.step / _commit_closed) on synthetic state-API answers."""
    tracker, cursor, records = Tracker(), 0.0, []
    cap = [CapacityPoint(0.0, CAPACITY)]
    t = 0.0
    while t <= until:
        answer = _state_api(tasks, t)
        if not use_finished:  # the sampler before finished tasks were read: RUNNING ones only
            answer = [a for a in answer if a.state == "RUNNING"]
        tracker.observe(t, [h for h, _ in task_holdings(answer, keys=_keys, tags_of=_tags, finished_since=cursor)])
        while cursor + WINDOW_S <= t - 2 * SAMPLE_S:
            records += attribute(tracker.holdings(), cap, cursor, cursor + WINDOW_S)
            tracker.prune(cursor + WINDOW_S)
            cursor += WINDOW_S
        t += SAMPLE_S
    return records, cursor


def _burst():
    # 24 one-second tasks, two at a time, all starting and ending strictly between samples (t=100, 110, ...)
    tasks, i = [], 0
    for base in (100.0, 110.0, 120.0, 170.0):
        for k in range(3):
            for lane in range(2):
                start = base + 1.5 + 2.5 * k + 0.1 * lane
                tasks.append(_task(i, start, start + 1.0))
                i += 1
    return tasks


def test_burst_between_samples_is_attributed_once_and_capacity_adds_up():
    tasks = _burst()
    records, cursor = _run_collector(tasks, use_finished=True)
    assert cursor == 240.0
    delta = [r for r in records if r.tenant == "delta"]
    assert sum(r.quantity_s for r in delta) == pytest.approx(24.0, rel=1e-9)
    assert {r.holder for r in delta} == {f"task:t{i}:0" for i in range(24)}
    assert {r.project for r in delta} == {"burst"}
    # every window: tenants + unattributed + idle = capacity x time; no record key written twice
    for ws in (0.0, 60.0, 120.0, 180.0):
        assert sum(r.quantity_s for r in records if r.window_start == ws) == pytest.approx(4.0 * WINDOW_S)
    assert len({r.key for r in records}) == len(records)


def test_without_finished_tasks_the_burst_is_missed():
    records, _ = _run_collector(_burst(), use_finished=False)
    assert sum(r.quantity_s for r in records if r.tenant == "delta") == 0.0


def test_task_seen_running_then_finished_gets_its_exact_end():
    # a 7 s task on 2 CPUs, seen RUNNING at the sample t=110 only, then among the finished ones
    tasks = [_task(0, 105.0, 112.0, cpus=2.0)]
    records, _ = _run_collector(tasks, use_finished=True)
    assert sum(r.quantity_s for r in records if r.tenant == "delta") == pytest.approx(14.0)
    # before: its exact start, but its end estimated at the midpoint of the samples 110 and 120
    records, _ = _run_collector(tasks, use_finished=False)
    assert sum(r.quantity_s for r in records if r.tenant == "delta") == pytest.approx(2.0 * (115.0 - 105.0))


def test_task_holdings_filters():
    tasks = [
        _task(0, 10.0, 11.0),                                # finished after the cursor: kept, closed
        _task(1, 1.0, 4.0),                                  # finished before the cursor: committed already
        _task(2, None, 12.0, state="FAILED"),                # cancelled before it ran: held nothing
        _task(3, 9.0, 12.0, state="FAILED"),                 # failed after running: held its CPU
        SimpleNamespace(**{**vars(_task(4, 8.0, None)), "state": "RUNNING", "end_time_ms": None}),
        SimpleNamespace(**{**vars(_task(5, 8.0, 9.0)), "placement_group_id": "pg1"}),  # counted by its group
        SimpleNamespace(**{**vars(_task(6, 8.0, 9.0)), "type": "ACTOR_TASK"}),         # the actor holds it
        _task(7, 8.0, 9.5, cpus=0.0),                        # zero-resource task
    ]
    got = {h.holder: (h.start, h.end, h.tenant) for h, _ in task_holdings(tasks, keys=_keys, tags_of=_tags,
                                                                         finished_since=5.0)}
    assert got == {"task:t0:0": (10.0, 11.0, "delta"), "task:t3:0": (9.0, 12.0, "delta"),
                   "task:t4:0": (8.0, None, "delta")}
    # without finished_since only running tasks count (the sampler's old behaviour, still the default)
    assert [h.holder for h, _ in task_holdings(tasks, keys=_keys, tags_of=_tags)] == ["task:t4:0"]


def _collector(tmp_path, monkeypatch, snapshots, **config):
    """A CollectorCore fed synthetic state-API snapshots (no Ray): returns the committed records."""
    import aifactory.cost.sampler as sampler
    from aifactory.cost.collector import CollectorConfig, CollectorCore

    it = iter(snapshots)
    monkeypatch.setattr(sampler, "take_snapshot", lambda *a, **kw: next(it))
    core = CollectorCore(CollectorConfig(ledger_path=str(tmp_path / "l.sqlite"), sample_interval_s=3.0,
                                         window_s=6.0, **config))
    core.cursor = 72.0
    for _ in snapshots:
        core.step()
    return core.ledger.usage(), core


def _job_snapshots():
    from aifactory.cost.attribution import Holding
    from aifactory.cost.sampler import Snapshot

    cap = {("cpu", "cpu"): 6.0}
    job = Holding("job:b", "beta", {("cpu", "cpu"): 2.0}, start=77.0, job_id="b")
    # submitted at 77; its supervisor comes up (and the job shows as a holder) only at the sample t=93
    snaps = [Snapshot(t=t, capacity=cap, holdings=[], pending_since=77.0) for t in (78.0, 81.0, 84.0, 87.0, 90.0)]
    snaps += [Snapshot(t=t, capacity=cap, holdings=[job]) for t in (93.0, 96.0, 99.0, 102.0, 105.0)]
    return snaps


def test_windows_wait_for_a_job_that_is_still_pending(tmp_path, monkeypatch):
    records, core = _collector(tmp_path, monkeypatch, _job_snapshots())
    assert core.cursor == 96.0
    job = sum(r.quantity_s for r in records if r.holder == "job:b")
    assert job == pytest.approx(2.0 * (96.0 - 77.0))  # from its start, though first seen 16 s later
    for ws in (72.0, 78.0, 84.0, 90.0):
        assert sum(r.quantity_s for r in records if r.window_start == ws) == pytest.approx(36.0)


def test_without_the_hold_a_late_job_loses_its_first_seconds(tmp_path, monkeypatch):
    records, _ = _collector(tmp_path, monkeypatch, _job_snapshots(), pending_hold_s=0.0)
    job = sum(r.quantity_s for r in records if r.holder == "job:b")
    assert job < 2.0 * (96.0 - 77.0) - 1.0  # windows before it showed were committed without it
