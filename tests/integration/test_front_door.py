"""The front door on the session's `factory up` cluster: plain `ray job submit` work is metered by the
always-on meter (killed mid-run, it comes back and loses nothing), and `factory costs` shows it per tenant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import METER_INTERVAL_S, run_factory

HOLD_S = 10.0
# tenant -> number of 1-CPU tasks, each holding its CPU for HOLD_S, all at once
TASKS = {"door-alpha": 2, "door-beta": 1}

JOB = """
import json, sys, time
import ray

ray.init()

@ray.remote(num_cpus=1)
def hold(s):
    t0 = time.time()
    time.sleep(s)
    return time.time() - t0

print(json.dumps({"held_s": ray.get([hold.remote(float(sys.argv[2])) for _ in range(int(sys.argv[1]))])}))
"""


def _ray_submit(cluster, tenant: str, script: Path, tasks: int) -> str:
    ray_cli = Path(sys.executable).parent / "ray"
    # No factory code and no virtualenv on PATH: `python` must be the cluster's own (factory up puts it first).
    env = cluster.env()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    proc = subprocess.run(
        [str(ray_cli), "job", "submit", "--address", cluster.dashboard_url, "--no-wait", "--working-dir",
         str(script.parent), "--metadata-json", json.dumps({"tenant": tenant}), "--", "python", script.name,
         str(tasks), str(HOLD_S)],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return next(w for w in (proc.stdout + proc.stderr).split() if w.strip("'").startswith("raysubmit_")).strip("'")


def _meter_pid() -> int:
    import ray

    from aifactory.cost.collector import get_collector

    return ray.get(get_collector().status.remote(), timeout=60)["pid"]


def test_plain_ray_jobs_are_metered_by_the_always_on_meter(ray_driver, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from aifactory.cost.ledger import Ledger
    from aifactory.cost.records import Resource
    from aifactory.home import FactoryHome

    cluster = ray_driver
    status = json.loads(run_factory("status", "--format", "json", home=cluster.home).stdout)
    assert status["meter"]["status"] == "ok", status["meter"]
    script = tmp_path / "hold.py"
    script.write_text(JOB)
    t_begin = time.time()
    ids = {tenant: _ray_submit(cluster, tenant, script, n) for tenant, n in TASKS.items()}
    time.sleep(HOLD_S / 2)
    first_pid = _meter_pid()
    os.kill(first_pid, signal.SIGKILL)  # mid-run: Ray restarts the detached actor, which resumes from the ledger
    jobs = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + 180
    while any(jobs.get_job_status(j).value not in ("SUCCEEDED", "FAILED", "STOPPED") for j in ids.values()):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(1)
    from ray.util.state import list_tasks

    held, slept = {}, {}
    for tenant, job_id in ids.items():
        assert jobs.get_job_status(job_id).value == "SUCCEEDED", jobs.get_job_logs(job_id)
        out = json.loads(jobs.get_job_logs(job_id).strip().splitlines()[-1])
        slept[tenant] = sum(out["held_s"])
        # What Ray itself says the job's tasks held: their CPU x (end - start) in the state API.
        ray_job = jobs.get_job_info(job_id).job_id
        tasks = list_tasks(address=cluster.gcs_address, filters=[("job_id", "=", ray_job)], detail=True,
                           raise_on_missing_output=False)
        held[tenant] = sum((t.end_time_ms - t.start_time_ms) / 1000 * t.required_resources.get("CPU", 0)
                           for t in tasks if t.type == "NORMAL_TASK" and t.end_time_ms and t.start_time_ms)
    t_end = max(jobs.get_job_info(j).end_time for j in ids.values()) / 1000
    assert _meter_pid() != first_pid
    # Wait for the meter to commit every window up to the jobs' end (one window plus two samples later).
    home = FactoryHome.from_env(cluster.home)
    deadline = time.monotonic() + 60
    while True:
        health = json.loads(run_factory("status", "--format", "json", home=cluster.home).stdout)["meter"]
        if health["commit_lag_s"] is not None and time.time() - health["commit_lag_s"] > t_end + 1:
            break
        assert time.monotonic() < deadline, health
        time.sleep(METER_INTERVAL_S)
    rows = json.loads(run_factory("costs", "--by", "tenant", "--since", str(int(t_begin) - 5), "--format", "json",
                                  home=cluster.home).stdout)
    by_tenant = {r["tenant"]: r for r in rows}
    for tenant, seconds in held.items():
        assert seconds >= slept[tenant]  # each task held its CPU at least while it slept
        assert abs(by_tenant[tenant]["cpu_s"] - seconds) <= 0.1 * seconds, (tenant, by_tenant[tenant], seconds,
                                                                           slept[tenant])
    assert {"idle"} <= set(by_tenant)
    # The capacity invariant over every committed window since the start: tenants + unattributed + idle =
    # capacity x time (the session cluster has 6 CPUs).
    records = [r for r in Ledger.of(home).usage(since=t_begin) if r.resource == Resource.CPU]
    windows = {(r.window_start, r.window_end) for r in records}
    capacity_s = 6.0 * sum(end - start for start, end in windows)
    assert abs(sum(r.quantity_s for r in records) - capacity_s) <= 0.005 * capacity_s
    table = run_factory("costs", "--by", "tenant", "--since", str(int(t_begin) - 5), home=cluster.home).stdout
    assert "door-alpha" in table and "capacity" in table


def _wait_committed(cluster, t_end: float) -> None:
    deadline = time.monotonic() + 60
    while True:
        health = json.loads(run_factory("status", "--format", "json", home=cluster.home).stdout)["meter"]
        if health["commit_lag_s"] is not None and time.time() - health["commit_lag_s"] > t_end + 1:
            return
        assert time.monotonic() < deadline, health
        time.sleep(METER_INTERVAL_S)


def test_work_a_driver_launches_is_metered_as_the_launchs_kind(ray_driver):
    """One driver, several launches (as `factory run` does): each launch's work carries its own kind, not the
    driver's, so unit costs (per validated checkpoint, per batch) are not $0."""
    import ray

    from aifactory.cost.ledger import Ledger
    from aifactory.home import FactoryHome
    from aifactory.tenancy import TenantRef, WorkloadKind
    from aifactory.workloads import Resources, Workload, launch

    home = FactoryHome.from_env(ray_driver.home)

    @ray.remote(num_cpus=1)
    def hold(s):
        time.sleep(s)

    wl = Workload(kind=WorkloadKind.BATCH_INFERENCE, tenant=TenantRef(tenant="door-spans"), name="spans",
                  resources=Resources(cpu=1))
    t0 = time.time()
    launch(wl, home=home, run=lambda handle: ray.get(hold.remote(3.0)))
    ray.get(hold.remote(0.5))  # after the launch: the driver's own kind
    _wait_committed(ray_driver, time.time())
    job = ray.get_runtime_context().get_job_id()
    rows = [r for r in Ledger.of(home).usage(since=t0 - 1) if r.job_id == job and r.resource.value == "cpu"]
    by_kind = {}
    for r in rows:
        by_kind[r.workload] = by_kind.get(r.workload, 0.0) + r.quantity_s
    assert abs(by_kind.get("batch-inference", 0.0) - 3.0) < 0.5, by_kind
    assert by_kind.get("other", 0.0) > 0.2, by_kind


def test_a_job_holding_more_than_it_declared_is_flagged(ray_driver, tmp_path):
    from ray.job_submission import JobSubmissionClient

    script = tmp_path / "hold.py"
    script.write_text(JOB)
    t0 = time.time()
    out = run_factory("submit", "--tenant", "door-over", "--num-cpus", "1", "--entrypoint-num-cpus", "0",
                      "--working-dir", str(tmp_path), "--", "python", "hold.py", "2", "4",
                      home=ray_driver.home).stdout
    sub = out.strip().splitlines()[-1]
    jobs = JobSubmissionClient(ray_driver.dashboard_url)
    deadline = time.monotonic() + 120
    while jobs.get_job_status(sub).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert jobs.get_job_status(sub).value == "SUCCEEDED", jobs.get_job_logs(sub)
    table = run_factory("costs", "--since", str(int(t0) - 5), home=ray_driver.home).stdout
    line = next((ln for ln in table.splitlines() if ln.startswith("alert (over_declared): tenant door-over")), None)
    assert line is not None, table
    assert "holds 2 CPU but declared 1" in line, line
