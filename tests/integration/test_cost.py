"""Cost accounting on the shared cluster: collector, attribution, restart, ledger, CLI, Prometheus panels.

One module fixture runs the whole scenario once (two tenants' jobs of known CPUs, a Serve deployment,
the collector killed mid-run); the tests then check its outcome. Prometheus runs as a plain process on
127.0.0.1 (installed by tests/tools/ensure_prometheus.sh) scraping the exporter and Ray's metrics port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, run_factory

JOB_S = 24.0
CPUS = {"alpha": 1.0, "beta": 2.0}
SAMPLE_S, WINDOW_S = 3.0, 6.0
# Beside the session cluster's own meter (factory up starts it): this scenario checks a ledger of its own.
PRIVATE_METER = "aifactory-cost-collector-test"
BURST_TASKS, BURST_TASK_S = 12, 1.0
# Run as a job of tenant delta: its tasks and actor inherit the job's id, hence its tenant. Each task
# reports the wall-clock time it ran, which lies within the span Ray records for it.
BURST_SCRIPT = f"""
import json, sys, time
import ray

ray.init()

@ray.remote(num_cpus=1)
def busy(i):
    t0 = time.time()
    time.sleep({BURST_TASK_S})
    return t0, time.time()

@ray.remote(num_cpus=1)
class Brief:
    def ping(self):
        return 1

spans = []
for wave in range({BURST_TASKS} // 4):
    spans += ray.get([busy.remote(i) for i in range(4)])
# and an actor that lives about a second
brief = Brief.remote()
ray.get(brief.ping.remote())
time.sleep(1.0)
ray.kill(brief)
json.dump({{"spans": spans, "actor": brief._actor_id.hex()}}, open(sys.argv[1], "w"))
"""


def _submit(client, **kw):
    deadline = time.monotonic() + 90
    while True:
        try:
            return client.submit(**kw)
        except RuntimeError as err:  # the job agent of a freshly started cluster may not be up yet
            if "agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.fixture(scope="module")
def scenario(ray_driver, tmp_path_factory):
    import ray
    from ray import serve

    from aifactory.cost.collector import CollectorConfig, start_collector, stop_collector
    from aifactory.home import FactoryHome
    from aifactory.jobs import Client

    cluster = ray_driver
    work = tmp_path_factory.mktemp("cost")
    ledger_path = work / "ledger.sqlite"
    exporter_port = free_port()
    config = CollectorConfig(ledger_path=str(ledger_path), cluster_id=f"test-{os.getpid()}",
                             dashboard_url=cluster.dashboard_url, sample_interval_s=SAMPLE_S, window_s=WINDOW_S,
                             exporter_port=exporter_port)
    t_begin = time.time()
    collector = start_collector(config, name=PRIVATE_METER)
    first = ray.get(collector.status.remote(), timeout=120)
    home = FactoryHome.from_env(cluster.home)
    jobs = {}
    for tenant, cpus in CPUS.items():
        client = Client(address=cluster.dashboard_url, tenant=tenant, project="costs", home=home)
        jobs[tenant] = (client, _submit(client, entrypoint=[sys.executable, "-c", f"import time; time.sleep({JOB_S})"],
                                        num_cpus=cpus, entrypoint_num_cpus=cpus))

    # A burst of 1-second tasks (tenant delta): most start and end between two samples.
    burst_out = work / "burst.json"
    (work / "burst.py").write_text(BURST_SCRIPT)
    delta = Client(address=cluster.dashboard_url, tenant="delta", project="burst", home=home)
    jobs["delta"] = (delta, _submit(delta, entrypoint=[sys.executable, str(work / "burst.py"), str(burst_out)]))

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Probe:
        def __call__(self, x: int) -> int:
            time.sleep(0.01)
            return x + 1

    handle = serve.run(Probe.bind(), name="costprobe", route_prefix="/costprobe")
    assert sum(handle.remote(i).result(timeout_s=60) for i in range(20)) == sum(range(1, 21))

    # Kill the collector mid-run (SIGKILL: no chance to flush); Ray restarts it and it resumes from the ledger.
    time.sleep(2 * WINDOW_S)
    os.kill(ray.get(collector.status.remote(), timeout=60)["pid"], signal.SIGKILL)
    time.sleep(2)
    collector = start_collector(config, name=PRIVATE_METER)  # finds the restarted named actor (or starts one)
    records = {}
    for tenant, (client, job_id) in jobs.items():
        records[tenant] = client.wait(job_id, timeout_s=180)
    for i in range(20):
        handle.remote(i).result(timeout_s=60)
    last_end = max(r.end_time for r in records.values())
    deadline = time.monotonic() + 90
    status = ray.get(collector.flush.remote(), timeout=120)
    while status["cursor"] < last_end + WINDOW_S and time.monotonic() < deadline:
        time.sleep(1)
        status = ray.get(collector.flush.remote(), timeout=120)
    burst = json.loads(burst_out.read_text())
    yield {"ledger_path": ledger_path, "jobs": records, "burst": burst, "first": first, "status": status,
           "t_begin": t_begin, "exporter_port": exporter_port, "work": work, "cluster": cluster, "handle": handle}
    serve.delete("costprobe")
    stop_collector(name=PRIVATE_METER)


def test_collector_resumed_after_kill(scenario):
    assert scenario["first"]["pid"] != scenario["status"]["pid"]
    assert scenario["status"]["resumed"] is True
    assert scenario["status"]["last_error"] is None
    assert scenario["status"]["gpu"].startswith("unknown")  # no GPU here: NVML usage is reported unknown


def test_attribution_of_known_jobs_within_2_percent(scenario):
    from aifactory.cost.ledger import Ledger

    ledger = Ledger(scenario["ledger_path"])
    for tenant in CPUS:
        rec = scenario["jobs"][tenant]
        assert rec.status == "SUCCEEDED" and rec.tenant == tenant
        expected = CPUS[tenant] * (rec.end_time - rec.start_time)
        got = sum(r.quantity_s for r in ledger.usage(tenant=tenant)
                  if r.resource.value == "cpu" and r.holder == f"job:{rec.id}")
        assert got == pytest.approx(expected, rel=0.02), (tenant, got, expected)
        assert {r.project for r in ledger.usage(tenant=tenant)} == {"costs"}


def test_burst_of_short_tasks_and_a_brief_actor_attributed_within_2_percent(scenario):
    from ray.util import state

    from aifactory.cost.ledger import Ledger

    rec = scenario["jobs"]["delta"]
    assert rec.status == "SUCCEEDED"
    # Known usage: each task held 1 CPU from its start to its end as Ray recorded them (the function's own
    # run, timed inside it, lies within that span).
    ray_tasks = [t for t in state.list_tasks(address=scenario["cluster"].dashboard_url, detail=True, limit=1000,
                                             filters=[("job_id", "=", rec.ray_job_id), ("name", "=", "busy")])
                 if str(t.state) in ("FINISHED", "TaskStatus.FINISHED")]
    assert len(ray_tasks) == BURST_TASKS == len(scenario["burst"]["spans"])
    ray_s = {f"task:{t.task_id}:{t.attempt_number}": (t.end_time_ms - t.start_time_ms) / 1000.0 for t in ray_tasks}
    expected = sum(ray_s.values())
    assert sum(end - start for start, end in scenario["burst"]["spans"]) <= expected
    rows = [r for r in Ledger(scenario["ledger_path"]).usage(tenant="delta") if r.resource.value == "cpu"]
    got: dict[str, float] = {}
    for r in rows:
        got[r.holder] = got.get(r.holder, 0.0) + r.quantity_s
    # the short-lived actor: its span from the GCS actor table (the state API's actors carry no times)
    from ray._private import state as gcs_state

    actor = gcs_state.actors(scenario["burst"]["actor"])
    assert actor["State"] == "DEAD" and actor["EndTime"] > actor["StartTime"] > 0
    actor_s = (actor["EndTime"] - actor["StartTime"]) / 1000.0
    assert got.pop(f"actor:{scenario['burst']['actor']}") == pytest.approx(actor_s, rel=0.02)
    assert set(got) == set(ray_s), (sorted(got), sorted(ray_s))
    assert sum(got.values()) == pytest.approx(expected, rel=0.02), {h: (got[h], ray_s[h]) for h in ray_s}
    assert {r.project for r in rows} == {"burst"}


def test_capacity_invariant_no_loss_no_double_count(scenario):
    import ray

    from aifactory.cost.ledger import Ledger

    capacity_cpus = ray.cluster_resources()["CPU"]
    per_window: dict[float, float] = {}
    for r in Ledger(scenario["ledger_path"]).usage():
        if r.resource.value == "cpu":
            per_window[r.window_start] = per_window.get(r.window_start, 0.0) + r.quantity_s
    starts = sorted(per_window)
    assert len(starts) >= 6
    # contiguous windows across the kill: nothing lost
    assert all(b - a == pytest.approx(WINDOW_S) for a, b in zip(starts, starts[1:]))
    # tenants + unattributed + idle = capacity x time in every window: nothing counted twice
    for ws in starts:
        assert per_window[ws] == pytest.approx(capacity_cpus * WINDOW_S, rel=0.005), ws


def test_serve_replicas_attributed_by_deployment(scenario):
    from aifactory.cost.ledger import Ledger

    deps = {r.deployment for r in Ledger(scenario["ledger_path"]).usage() if r.deployment}
    assert "costprobe/Probe" in deps


def test_costs_cli_after_the_cluster_is_gone(scenario, tmp_path):
    # A fresh home with only the ledger file: no cluster, no address.
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(scenario["ledger_path"], home / "ledger.sqlite")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    rows = json.loads(run_factory("costs", "--format", "json", home=str(home), env=env).stdout)
    by = {r["tenant"]: r for r in rows}
    assert {"alpha", "beta", "idle"} <= set(by)
    assert by["beta"]["cost_usd"] > by["alpha"]["cost_usd"] > 0
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=0.01)
    csv_out = run_factory("costs", "--tenant", "alpha", "--by", "job", "--format", "csv", home=str(home), env=env).stdout
    assert csv_out.splitlines()[0].startswith("tenant,project,job_id")
    assert all(line.startswith("alpha,") for line in csv_out.splitlines()[1:])
    table = run_factory("costs", "--by", "day", home=str(home), env=env).stdout
    assert "DAY" in table and "beta" in table
    out = run_factory("costs", "report", "--out", str(tmp_path / "rep"), home=str(home), env=env).stdout.strip()
    page = Path(out).read_text()
    assert "alpha" in page and (tmp_path / "rep" / "cost_by_tenant.png").stat().st_size > 1000
    bad = run_factory("costs", "--since", "last tuesday", home=str(home), env=env, check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_quota_refuses_submission(scenario, tmp_path):
    from aifactory.exceptions import QuotaExceeded

    cluster = scenario["cluster"]
    env = cluster.env()
    run_factory("costs", "set-quota", "gamma", "--cpu", "1", home=cluster.home, env=env)
    try:
        proc = run_factory("submit", "--tenant", "gamma", "--num-cpus", "2", "--", "python", "-c", "print(1)",
                           home=cluster.home, env=env, check=False)
        assert proc.returncode != 0
        assert "QuotaExceeded(tenant='gamma', lane='factory', pool='all', resource='CPU', requested=2" in proc.stderr
        from aifactory.home import FactoryHome
        from aifactory.jobs import Client

        with pytest.raises(QuotaExceeded):
            Client(address=cluster.dashboard_url, tenant="gamma", home=FactoryHome.from_env(cluster.home)).submit(
                ["python", "-c", "print(1)"], num_cpus=1.5)
        # a per-pool quota: work that names no pool may land in that pool, so it must fit there too
        run_factory("costs", "set-quota", "gamma", "--gpu", "0.5", "--pool", "gpu-h200", home=cluster.home, env=env)
        proc = run_factory("submit", "--tenant", "gamma", "--num-cpus", "1", "--num-gpus", "1", "--", "python", "-c",
                           "print(1)", home=cluster.home, env=env, check=False)
        assert proc.returncode != 0
        assert "QuotaExceeded(tenant='gamma', lane='factory', pool='gpu-h200', resource='GPU', requested=1" in proc.stderr
        assert "limit=0.5" in proc.stderr
    finally:
        (Path(cluster.home) / "budgets.yaml").unlink(missing_ok=True)


def _prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_dashboard_panels_return_data_in_prometheus(scenario, tmp_path):
    from aifactory.cost.budgets import BudgetsConfig, save_budgets
    from aifactory.cost.dashboards import dashboard, queries, write_provisioning
    from aifactory.cost.ledger import Ledger
    from aifactory.home import FactoryHome

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (make test installs it: tests/tools/ensure_prometheus.sh)")
    # Budgets and unit-cost inputs live beside the ledger (the exporter's home).
    ledger_home = FactoryHome.from_env(scenario["ledger_path"].parent)
    save_budgets(ledger_home, BudgetsConfig.model_validate({"tenants": {"alpha": {"budget": {"hard_usd": 10.0}}}}))
    Ledger(scenario["ledger_path"]).record_event(key="ckpt-1", tenant="alpha", project="costs",
                                                 kind="checkpoint_validated")
    board = dashboard()
    path = write_provisioning(tmp_path / "grafana")
    assert json.loads(path.read_text())["uid"] == board["uid"]
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        "scrape_configs:\n"
        f"  - job_name: aifactory\n    static_configs: [{{targets: ['127.0.0.1:{scenario['exporter_port']}']}}]\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{scenario['cluster'].metrics_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),
    )
    try:
        # keep serving traffic flowing so the latency rate() windows have samples
        handle = scenario["handle"]
        missing = queries(board)
        deadline = time.monotonic() + 120
        while missing and time.monotonic() < deadline:
            for i in range(10):
                handle.remote(i).result(timeout_s=60)
            time.sleep(2)
            still = []
            for title, expr in missing:
                try:
                    if not _prom_query(port, expr):
                        still.append((title, expr))
                except OSError:
                    still.append((title, expr))
            missing = still
        assert not missing, f"panels without data: {missing}"
        # the cost figures Prometheus holds are the ledger's
        alpha = sum(float(s["value"][1]) for s in _prom_query(port, 'aifactory_cost_usd{tenant="alpha"}'))
        assert alpha > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_gpu_probe_reads_nvml_on_its_own_node(ray_driver):
    # The per-node NVML reader the collector starts on each GPU node, run here on this (GPU-less) node:
    # it lands on the node it was pinned to and reports GPU use as unknown, without error.
    import ray

    from aifactory.cost.gpu import GpuMeter

    node = ray.get_runtime_context().get_node_id()
    meter = GpuMeter(f"aifactory-test-{os.getpid()}")
    try:
        assert meter.sample([node], {}, timeout_s=120) == {}
        assert meter.status[node].startswith("unknown ("), meter.status
        assert ray.get(meter._probes[node].where.remote(), timeout=60) == node
    finally:
        meter.stop()
