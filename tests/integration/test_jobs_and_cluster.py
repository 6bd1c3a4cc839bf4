"""The foundation on a real cluster: `factory up` idempotency, tagged submissions, attribution."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.conftest import free_port, run_factory


def _wait_terminal(cluster, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = json.loads(run_factory("jobs", "--format", "json", home=cluster.home).stdout)
        match = [j for j in jobs if j["id"] == job_id]
        if match and match[0]["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return match[0]
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish")


def test_up_is_idempotent_and_status_reports(factory_cluster):
    out = json.loads(run_factory("up", "--format", "json", home=factory_cluster.home).stdout)
    assert out["status"] == "already up" and out["address"] == factory_cluster.gcs_address
    status = json.loads(run_factory("status", "--format", "json", home=factory_cluster.home).stdout)
    assert status["status"] == "up" and status["resources_total"]["CPU"] == 6.0
    assert status["dashboard"].startswith("http://127.0.0.1:")


def test_job_api_refuses_unauthenticated_calls(factory_cluster):
    with __import__("pytest").raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{factory_cluster.dashboard_url}/api/jobs/", timeout=5)
    assert info.value.code == 401


def test_factory_submit_and_plain_ray_job_submit_are_attributed_alike(factory_cluster):
    home = factory_cluster.home
    ours = run_factory("submit", "--tenant", "search", "--project", "ranking", "--num-cpus", "0.5",
                       "--", "python", "-c", "print('from factory')", home=home).stdout.strip()
    ray_cli = Path(sys.executable).parent / "ray"
    proc = subprocess.run(
        [str(ray_cli), "job", "submit", "--address", factory_cluster.dashboard_url, "--no-wait",
         "--metadata-json", json.dumps({"tenant": "ads", "project": "ctr"}), "--", "python", "-c", "print(1)"],
        capture_output=True, text=True, env=factory_cluster.env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    theirs = next(w for w in (proc.stdout + proc.stderr).split() if w.strip("'").startswith("raysubmit_")).strip("'")
    untagged = subprocess.run(
        [str(ray_cli), "job", "submit", "--address", factory_cluster.dashboard_url, "--no-wait", "--", "python", "-c", "1"],
        capture_output=True, text=True, env=factory_cluster.env(), timeout=120,
    )
    anon = next(w for w in (untagged.stdout + untagged.stderr).split() if w.strip("'").startswith("raysubmit_")).strip("'")

    a = _wait_terminal(factory_cluster, ours)
    b = _wait_terminal(factory_cluster, theirs)
    c = _wait_terminal(factory_cluster, anon)
    assert (a["tenant"], a["project"], a["status"]) == ("search", "ranking", "SUCCEEDED")
    assert (b["tenant"], b["project"], b["status"]) == ("ads", "ctr", "SUCCEEDED")
    assert c["tenant"] == "unattributed"
    # provenance travels with our submissions
    assert a["metadata"]["code_version"] and a["metadata"]["submitted_by"] and a["metadata"]["workload"] == "other"
    only_ads = json.loads(run_factory("jobs", "--tenant", "ads", "--format", "json", home=home).stdout)
    assert {j["tenant"] for j in only_ads} == {"ads"} and theirs in {j["id"] for j in only_ads}
    logs = run_factory("logs", ours, home=home).stdout
    assert "from factory" in logs


def test_stop_and_unknown_job(factory_cluster):
    home = factory_cluster.home
    job = run_factory("submit", "--tenant", "search", "--", "python", "-c", "import time; time.sleep(120)",
                      home=home).stdout.strip()
    time.sleep(2)
    run_factory("stop", job, home=home)
    assert _wait_terminal(factory_cluster, job)["status"] == "STOPPED"
    proc = run_factory("logs", "raysubmit_doesnotexist", home=home, check=False)
    assert proc.returncode == 1 and "no job 'raysubmit_doesnotexist'" in proc.stderr and "Traceback" not in proc.stderr


def test_sdk_submit_and_wait(factory_cluster):
    from aifactory import Client, FactoryHome

    client = Client(address=factory_cluster.dashboard_url, tenant="sdk-team", home=FactoryHome.from_env(factory_cluster.home))
    job = client.submit(["python", "-c", "print('sdk')"], num_cpus=0.25)
    record = client.wait(job, timeout_s=120)
    assert record.status == "SUCCEEDED" and record.tenant == "sdk-team"


def test_up_down_idempotent_on_a_second_home(tmp_path, factory_cluster):
    home = str(tmp_path / "second")
    ports = ["--port", str(free_port()), "--dashboard-port", str(free_port()), "--metrics-port", str(free_port())]
    first = json.loads(run_factory("up", "--num-cpus", "1", "--serve-ingress", "python", *ports, "--format", "json", home=home).stdout)
    assert first["status"] == "started"
    again = json.loads(run_factory("up", *ports, "--format", "json", home=home).stdout)
    assert again["status"] == "already up"
    assert run_factory("down", home=home).stdout.strip() == "stopped"
    assert run_factory("down", home=home).stdout.strip() == "not running"
    assert run_factory("status", home=home, check=False).returncode == 3
    # the session cluster was left alone
    assert json.loads(run_factory("status", "--format", "json", home=factory_cluster.home).stdout)["status"] == "up"
