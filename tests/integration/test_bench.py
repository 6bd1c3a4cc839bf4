"""A tiny real sweep on the session cluster: Tune trials against a real Serve deployment over HTTP,
records stored and read back, the tenant on the driver's job, compare and report through the CLI."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.integration.conftest import run_factory

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def smoke_run(ray_driver):
    from aifactory.bench.runner import run_sweep
    from aifactory.bench.spec import find_spec
    from aifactory.home import FactoryHome
    from aifactory.tenancy import TenantRef

    # The shipped smoke spec with a lighter load: the test checks the machinery, not the figures.
    spec = find_spec("smoke", overrides={"load.num_requests": 60, "load.warmup_requests": 8})
    home = FactoryHome.from_env(ray_driver.home)
    t0 = time.monotonic()
    outcome = run_sweep(spec, home=home, tenant=TenantRef(tenant="bench-team"), dataset_version="ds-test")
    return outcome, home, time.monotonic() - t0


def test_sweep_runs_every_repeat_and_measures_latency(smoke_run):
    outcome, _, wall_s = smoke_run
    trials = outcome.trials
    assert len(trials) == 6 and all(t.status == "ok" for t in trials), [t.error for t in trials]
    assert sorted({t.config_id for t in trials}) == ["b1-w0.005-r1-interactive", "b16-w0.005-r1-interactive"]
    for t in trials:
        m = t.metrics
        assert t.tenant == "bench-team"
        assert m["num_ok"] == 60 and m["num_errors"] == 0
        assert 0 < m["p50_ms"] <= m["p95_ms"] <= m["p99_ms"]
        assert m["throughput_rps"] > 0
        # priced from the packaged price book; energy honestly unavailable without a GPU
        assert m["cost_per_1k_requests_usd"] > 0
        if m["energy_j"] is None:
            assert m["requests_per_joule"] is None and m["unavailable"]["requests_per_joule"]
    # each configuration deployed once; its later repeats reused the running app
    for cid in {t.config_id for t in trials}:
        deploys = [t.metrics["deploy_s"] for t in trials if t.config_id == cid]
        assert deploys[0] > 0 and deploys[1:] == [0.0, 0.0]
    ctx = outcome.run.context
    assert ctx["dataset_version"] == "ds-test" and ctx["hardware"]["cpu_model"] and ctx["region"] == "local"
    assert ctx["hardware"]["gpu_name"] and ctx["code_version"]
    print(f"smoke sweep: {wall_s:.1f}s")


def test_records_read_back_and_serve_apps_are_removed(smoke_run):
    from ray import serve

    from aifactory.bench.results import ResultStore

    outcome, home, _ = smoke_run
    run, trials = ResultStore(home).get(outcome.run.run_id)
    assert run.run_id == outcome.run.run_id and run.tenant == "bench-team" and run.schema_version == 1
    assert [t.model_dump() for t in trials] == [t.model_dump() for t in outcome.trials]
    deadline = time.monotonic() + 60
    while any(a.startswith(f"bench-{run.run_id}") for a in serve.status().applications):
        assert time.monotonic() < deadline, "the sweep's Serve apps were not deleted"
        time.sleep(1)


def test_cli_compare_flags_a_regression_and_report_writes_files(smoke_run, tmp_path):
    from aifactory.bench.results import ResultStore

    outcome, home, _ = smoke_run
    rid = outcome.run.run_id
    same = run_factory("bench", "compare", rid, rid, home=str(home.root))
    assert "0 regression(s)" in same.stdout

    # The real run's records with controlled throughputs, so the rule is tested, not this machine's noise: a tight
    # baseline, and a candidate whose unbatched configuration lost 60% of its throughput in every repeat.
    store = ResultStore(home)
    base, src = tmp_path / "base", tmp_path / "slower"
    for dest, factor in ((base, 1.0), (src, 0.4)):
        shutil.copytree(f"{store.root}/{rid}", dest)
        lines = []
        for line in (dest / "trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["config_id"].startswith("b1-"):
                rec["metrics"]["throughput_rps"] = (100.0 + rec["repeat"]) * factor
            lines.append(json.dumps(rec))
        (dest / "trials.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_factory("bench", "compare", str(base), str(src), home=str(home.root), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION b1-w0.005-r1-interactive: throughput_rps" in proc.stdout

    out = tmp_path / "report"
    rep = run_factory("bench", "report", rid, "--out", str(out), home=str(home.root))
    assert "recommended:" in rep.stdout
    assert (out / "report.md").is_file()
    text = (out / "report.md").read_text()
    assert "## Recommendation (p99 under 500 ms" in text and "Pareto front" in text and "ds-test" in text
    for png in ("latency_vs_throughput.png", "cost_vs_p99.png", "pareto_front.png"):
        assert (out / png).stat().st_size > 5000

    listed = run_factory("bench", "list", "--format", "json", home=str(home.root))
    assert rid in [r["run_id"] for r in json.loads(listed.stdout)]


def test_cli_bench_run_tags_the_driver_job_with_the_tenant(ray_driver, tmp_path):
    """`factory bench run` on the cluster: the sweep's driver job carries the tenant in its metadata."""
    from ray.util.state import list_jobs

    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "name: tiny\nkind: serve-mlp\ntenant: {tenant: demo}\nrepeats: 3\n"
        "serving: {max_batch_size: [8], batch_wait_timeout_s: [0.002]}\n"
        "load: {num_requests: 30, concurrency: 4, warmup_requests: 4}\n"
        "model: {input_dim: 16, hidden_dim: 32, num_layers: 1, output_dim: 4}\nslo: {p99_ms: 2000}\n")
    proc = run_factory("bench", "run", str(spec), "--tenant", "acme", "--address", ray_driver.gcs_address,
                       home=ray_driver.home, env=ray_driver.env(), timeout=300)
    assert "3/3 trials ok" in proc.stdout, proc.stdout + proc.stderr
    assert "recommended: b8-w0.002-r1-interactive" in proc.stdout
    jobs = [j for j in list_jobs(address=ray_driver.dashboard_url, detail=True)
            if (j.metadata or {}).get("bench_spec") == "tiny"]
    assert jobs and all(j.metadata["tenant"] == "acme" and j.metadata["workload"] == "bench" for j in jobs)
