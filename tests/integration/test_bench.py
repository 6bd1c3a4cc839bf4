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
        # from what the meter read the app's replicas holding over the measured load, not declared x wall
        assert m["cost_basis"] == "metered", m["unavailable"].get("metered")
        assert m["metered_cpu_s"] == pytest.approx(m["replica_cpu_s"], rel=0.1, abs=0.05)
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
    assert run.run_id == outcome.run.run_id and run.tenant == "bench-team" and run.schema_version == 2
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


# ---- the kinds on the factory's own components: the real completions app and the real GPT trainer --------

BENCH_MODEL = "bench-itest-gpt"


@pytest.fixture(scope="module")
def bench_artifacts(ray_driver, tmp_path_factory):
    """A registered GPT version (random weights: serving measures the app, not the model's quality) and a dataset
    version ingested from the stdlib's json package (as test_train does), both in the session's factory home."""
    import os
    import sysconfig

    import torch

    from aifactory.data.ingest import IngestConfig, ingest, local_writer
    from aifactory.home import FactoryHome
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.registry import ModelRegistry
    from aifactory.tenancy import TenantRef

    home = FactoryHome.from_env(ray_driver.home).ensure()
    cfg = GPTConfig(seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench-weights") / "w.pt"
    torch.save(GPT(cfg).state_dict(), path)
    mv = ModelRegistry(home).register(BENCH_MODEL, weights_path=str(path), model_config=cfg.model_dump(),
                                      manifest={"seed": 0, "tenant": "bench-team"})
    src = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    ds = ingest(home, IngestConfig(source=src, seq_len=65, target_shard_mb=0.02, validation_fraction=0.2),
                tenant=TenantRef(tenant="bench-team"), writer=local_writer)
    return home, mv, ds.version


def test_serve_completions_sweep_drives_the_real_app(bench_artifacts, serve_http_port):
    from aifactory.bench.runner import run_sweep
    from aifactory.bench.spec import find_spec

    home, mv, _ = bench_artifacts
    spec = find_spec("serve-completions", overrides={
        "serving.max_batch_size": [4], "load.num_requests": 16, "load.concurrency": 4, "load.warmup_requests": 4,
        "completions.model_name": BENCH_MODEL, "completions.max_tokens": 8})
    t0 = time.monotonic()
    outcome = run_sweep(spec, home=home)
    trials = outcome.trials
    assert len(trials) == 3 and all(t.status == "ok" for t in trials), [t.error for t in trials]
    for t in trials:
        m = t.metrics
        assert m["num_ok"] == 16 and m["num_errors"] == 0, m["status_counts"]
        assert m["model_version"] == mv.ref
        # every answer generated tokens, at most max_tokens each, counted from the answers' usage
        assert 16 <= m["completion_tokens"] <= 16 * 8 and m["prompt_tokens"] > 0
        assert m["tokens_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"]
        assert m["cost_per_1k_requests_usd"] > 0 and m["cost_per_1m_tokens_usd"] > 0
    assert [t.metrics["deploy_s"] > 0 for t in trials] == [True, False, False]  # deployed once, reused
    assert outcome.run.context["model_version"] == mv.ref  # the version measured, resolved on the driver
    print(f"serve-completions sweep: {time.monotonic() - t0:.1f}s")


def test_serve_embeddings_sweep_drives_the_real_minilm_app(ray_driver, serve_http_port):
    from aifactory.bench.runner import run_sweep
    from aifactory.bench.spec import find_spec
    from aifactory.home import FactoryHome

    spec = find_spec("serve-embeddings", overrides={
        "serving.max_batch_size": [8], "load.num_requests": 12, "load.concurrency": 4, "load.warmup_requests": 4,
        "embeddings.inputs_per_request": 2})
    t0 = time.monotonic()
    outcome = run_sweep(spec, home=FactoryHome.from_env(ray_driver.home))
    trials = outcome.trials
    assert len(trials) == 3 and all(t.status == "ok" for t in trials), [t.error for t in trials]
    for t in trials:
        m = t.metrics
        assert m["num_ok"] == 12 and m["num_errors"] == 0 and m["inputs"] == 24, m["status_counts"]
        assert m["tokens"] >= 24 * 3  # MiniLM counts [CLS] and [SEP] plus at least one token per text
        assert m["tokens_per_s"] > 0 and m["cost_per_1m_tokens_usd"] > 0 and m["cost_per_1k_requests_usd"] > 0
    print(f"serve-embeddings sweep: {time.monotonic() - t0:.1f}s")


def test_train_gpt_sweep_runs_the_real_trainer_to_a_target(bench_artifacts):
    from aifactory.bench.runner import run_sweep
    from aifactory.bench.spec import find_spec
    from aifactory.registry import ModelRegistry

    home, _, ds_version = bench_artifacts
    before = {m.ref for m in ModelRegistry(home).list()}
    # A loose target (a fresh byte-level model starts near ln 256 = 5.5) so every repeat reaches it at the first
    # evaluation. Each repeat is one full fit (~40 s here, nearly all Train and Ray Data start-up); running the three
    # at once measured no faster (134 s vs 131 s), so they run one at a time.
    spec = find_spec("train-gpt", overrides={
        "training.precision": ["bf16"], "training.batch_size": [8], "max_concurrent_trials": 1,
        "train.target_val_loss": 6.0, "train.max_steps": 4, "train.eval_every_steps": 4,
        "gpt.dataset_version": ds_version, "gpt.validation_batches": 1})
    t0 = time.monotonic()
    outcome = run_sweep(spec, home=home)
    trials = outcome.trials
    assert len(trials) == 3 and all(t.status == "ok" for t in trials), [t.error for t in trials]
    for t in trials:
        m = t.metrics
        assert m["reached_target"] and m["steps_to_quality"] == 4 and m["val_loss_at_quality"] < 6.0
        assert 0 < m["time_to_quality_s"] < m["train_wall_s"] and m["steps"] == 4
        assert m["dataset_version"] == ds_version and m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0
        assert m["num_validated_checkpoints"] >= 1 and m["cost_per_validated_checkpoint_usd"] > 0
        # the workers' own spans (inside the run, so at most what was declared for its whole wall time)
        assert m["cost_basis"] == "metered", m["unavailable"].get("metered")
        assert 0 < m["metered_cpu_s"] <= m["train_cpu_s"] * 1.02
    assert len({t.metrics["train_run_id"] for t in trials}) == 3
    assert outcome.run.context["dataset_version"] == ds_version
    assert {m.ref for m in ModelRegistry(home).list()} == before  # a benchmark registers no model versions
    print(f"train-gpt sweep: {time.monotonic() - t0:.1f}s")
