"""Security on the shared cluster: the control API on Ray Serve, tenant isolation on every entry point,
signed artifacts, the audit log, quotas enforced server-side, and a schemathesis fuzz of the published spec.

Tenants here are ``sec-alpha`` and ``sec-beta`` so that nothing collides with other components' tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest


APP, PREFIX = "aif-control", "/aif-control"
ALPHA, BETA = "sec-alpha", "sec-beta"


@pytest.fixture(scope="module")
def control(ray_driver, serve_http_port):
    """The control app deployed with Serve on 127.0.0.1 (reusing a running Serve), plus three API keys."""
    from ray import serve

    from aifactory.home import FactoryHome
    from aifactory.security.apikeys import KeyStore
    from serve_apps.control import app_builder

    home = FactoryHome.from_env(ray_driver.home)
    store = KeyStore(home)
    keys = {
        ALPHA: store.create(tenant=ALPHA, name="sec-test").secret,
        BETA: store.create(tenant=BETA, name="sec-test").secret,
        "admin": store.create(tenant=None, role="admin", name="sec-test").secret,
    }
    t0 = time.monotonic()
    port = serve_http_port
    serve.run(app_builder({"home": str(home.root)}), name=APP, route_prefix=PREFIX)
    url = f"http://127.0.0.1:{port}{PREFIX}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print(f"control API up in {time.monotonic() - t0:.1f}s at {url}")
    yield {"url": url, "home": home, "keys": keys}
    serve.delete(APP)


def _c(control, who: str | None, timeout: float = 60):
    headers = {"Authorization": f"Bearer {control['keys'][who]}"} if who else {}
    return httpx.Client(base_url=control["url"], headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def jobs(control):
    """One finished job per tenant, submitted through the API with the real ControlClient."""
    from aifactory.control.client import ControlClient

    ids = {}
    for tenant in (ALPHA, BETA):
        client = ControlClient(control["url"], control["keys"][tenant])
        ids[tenant] = client.submit(["python", "-c", f"print('secret of {tenant}')"], num_cpus=0.1)
        assert client.wait(ids[tenant], timeout_s=120).status == "SUCCEEDED"
    return ids


def test_unauthenticated_calls_are_refused_on_every_entry_point(control, jobs):
    anon = _c(control, None)
    bad = httpx.Client(base_url=control["url"], headers={"Authorization": "Bearer aifk_0000000000000000_" + "x" * 43})
    for client in (anon, bad):
        for method, path, body in [
            ("GET", "/v1/jobs", None), ("POST", "/v1/jobs", {"entrypoint": "echo hi"}),
            ("GET", f"/v1/jobs/{jobs[ALPHA]}", None), ("GET", f"/v1/jobs/{jobs[ALPHA]}/logs", None),
            ("POST", f"/v1/jobs/{jobs[ALPHA]}/stop", None), ("GET", "/v1/costs", None), ("GET", "/v1/budgets", None),
            ("GET", "/v1/audit", None), ("GET", "/v1/keys", None), ("GET", "/v1/serve/apps", None),
            ("POST", "/v1/serve/apps", {"name": "x", "model_name": "m"}),
            ("POST", f"/v1/serve/apps/{ALPHA}.chat/rollback", None),
        ]:
            resp = client.request(method, path, json=body)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "unauthenticated"


def test_jobs_are_tagged_from_the_key_and_isolated(control, jobs):
    alpha, beta, admin = _c(control, ALPHA), _c(control, BETA), _c(control, "admin")
    mine = alpha.get("/v1/jobs").json()
    assert {j["tenant"] for j in mine} == {ALPHA} and jobs[ALPHA] in {j["id"] for j in mine}
    assert alpha.get("/v1/jobs", params={"tenant": BETA}).json() == mine  # asking for beta shows alpha's only
    assert "secret of sec-alpha" in alpha.get(f"/v1/jobs/{jobs[ALPHA]}/logs").json()["logs"]
    # beta's job answers exactly like a job that does not exist
    for method, suffix in (("GET", ""), ("GET", "/logs"), ("POST", "/stop")):
        theirs = alpha.request(method, f"/v1/jobs/{jobs[BETA]}{suffix}")
        ghost = alpha.request(method, f"/v1/jobs/raysubmit_doesnotexist{suffix}")
        assert theirs.status_code == ghost.status_code == 404, theirs.text
        assert theirs.json()["error"]["message"].replace(jobs[BETA], "?") == \
            ghost.json()["error"]["message"].replace("raysubmit_doesnotexist", "?")
        assert "secret of sec-beta" not in theirs.text
    assert beta.get(f"/v1/jobs/{jobs[BETA]}").json()["tenant"] == BETA
    every = {j["id"] for j in admin.get("/v1/jobs").json()}
    assert {jobs[ALPHA], jobs[BETA]} <= every
    # the tenant in the body can only be one's own
    resp = alpha.post("/v1/jobs", json={"entrypoint": "echo x", "tenant": BETA})
    assert resp.status_code == 403


def test_stop_is_scoped_and_each_action_audited_exactly_once(control, jobs):
    from aifactory import audit

    home = control["home"]
    alpha = _c(control, ALPHA)
    me = alpha.get("/v1/whoami").json()
    job = alpha.post("/v1/jobs", json={"entrypoint": "python -c 'import time; time.sleep(60)'", "num_cpus": 0.1})
    assert job.status_code == 201 and job.json()["tenant"] == ALPHA
    job_id = job.json()["id"]
    assert _c(control, BETA).post(f"/v1/jobs/{job_id}/stop").status_code == 404  # beta cannot stop it
    deadline = time.monotonic() + 60
    while alpha.get(f"/v1/jobs/{job_id}").json()["status"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alpha.post(f"/v1/jobs/{job_id}/stop").json()["stopped"] is True
    submits = audit.query(home, action="job.submit", target=job_id)
    stops = audit.query(home, action="job.stop", target=job_id)
    assert len(submits) == 1 and len(stops) == 1
    assert submits[0].actor == stops[0].actor == f"apikey:{me['key_id']}" and submits[0].tenant == ALPHA
    for tenant in (ALPHA, BETA):  # the fixture's submissions: once each, no stops
        assert len(audit.query(home, action="job.submit", target=jobs[tenant])) == 1
    assert audit.query(home, action="job.stop", target=jobs[ALPHA]) == []
    # a tenant reads only its own audit trail through the API
    trail = alpha.get("/v1/audit", params={"action": "job"}).json()
    assert {e["tenant"] for e in trail} == {ALPHA} and job_id in {e["target"] for e in trail}
    assert audit.verify(home) >= 4


def test_quota_is_enforced_server_side(control):
    from aifactory.cost.budgets import load_budgets, save_budgets

    home = control["home"]
    before = load_budgets(home)
    admin, alpha = _c(control, "admin"), _c(control, ALPHA)
    try:
        assert admin.put(f"/v1/budgets/{ALPHA}", json={"quota": {"cpu": 1}}).status_code == 200
        resp = alpha.post("/v1/jobs", json={"entrypoint": "echo too-big", "num_cpus": 4})
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "quota_exceeded"
        assert alpha.put(f"/v1/budgets/{ALPHA}", json={"quota": {"cpu": 100}}).status_code == 403
    finally:
        save_budgets(home, before)


def test_costs_are_scoped(control):
    alpha = _c(control, ALPHA)
    for by in ("tenant", "project", "job"):
        resp = alpha.get("/v1/costs", params={"by": by, "tenant": BETA})
        assert resp.status_code == 200 and all(r["tenant"] == ALPHA for r in resp.json())
    assert all(r["tenant"] == ALPHA for r in alpha.get("/v1/budgets").json())


def test_serving_refuses_tampered_and_foreign_models(control, tmp_path):
    from aifactory.registry import ModelRegistry

    home = control["home"]
    started = time.time()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"\x00" * 2048)
    reg = ModelRegistry(home)
    mv = reg.register("sec-model", weights_path=str(weights), model_config={"d_model": 8},
                      manifest={"tenant": ALPHA})
    alpha, beta = _c(control, ALPHA), _c(control, BETA)
    # another tenant's model is invisible: 404 like a model that does not exist
    theirs = beta.post("/v1/serve/apps", json={"name": "chat", "model_name": "sec-model", "model_version": mv.version})
    ghost = beta.post("/v1/serve/apps", json={"name": "chat", "model_name": "sec-none", "model_version": "v1"})
    assert theirs.status_code == ghost.status_code == 404
    # a tampered weights file is refused before Serve is touched
    with open(mv.weights_path, "r+b") as f:
        f.write(b"\x01")
    resp = alpha.post("/v1/serve/apps", json={"name": "chat", "model_name": "sec-model", "model_version": mv.version})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "integrity_error"
    # a re-labelled manifest (beta claims alpha's model) breaks the signature
    mv2 = reg.register("sec-model", weights_path=str(weights), model_config={"d_model": 8},
                       manifest={"tenant": ALPHA})
    # (copied into beta's namespace and re-labelled there: the signature names alpha's)
    data = json.loads(open(reg._join(ALPHA, "sec-model", mv2.version, "version.json")).read())
    data["tenant"] = data["manifest"]["tenant"] = BETA
    Path(reg._join(BETA, "sec-model", mv2.version)).mkdir(parents=True)
    Path(reg._join(BETA, "sec-model", mv2.version, "version.json")).write_text(json.dumps(data))
    resp = beta.post("/v1/serve/apps", json={"name": "chat", "model_name": "sec-model", "model_version": mv2.version})
    assert resp.status_code == 409 and "signature" in resp.json()["error"]["message"]
    # another tenant's application: 404 on every rollout verb; the app list holds only one's own apps
    for verb, body in (("canary", {"model_version": "v1", "percent": 5}), ("promote", None), ("rollback", None)):
        assert alpha.post(f"/v1/serve/apps/{BETA}.chat/{verb}", json=body).status_code == 404
    apps = alpha.get("/v1/serve/apps")
    assert apps.status_code == 200 and all(a["tenant"] == ALPHA for a in apps.json())
    from aifactory import audit

    # nothing was deployed, nothing audited (the session home holds other tests' deploys from before)
    assert audit.query(home, action="serve", since=started) == []


def test_tenant_app_answers_only_its_keys_and_its_cache_is_managed_per_tenant(control, serve_http_port, tmp_path):
    """A completions app deployed through the control API: only its tenant's factory keys get answers, and the
    tenant reads and flushes its own cached answers (on every replica) while other tenants get 404."""
    import torch

    from aifactory import audit
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.registry import ModelRegistry

    home = control["home"]
    cfg = GPTConfig(seq_len=256, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    torch.manual_seed(0)
    torch.save(GPT(cfg).state_dict(), tmp_path / "gpt.pt")
    mv = ModelRegistry(home).register("sec-gpt", weights_path=str(tmp_path / "gpt.pt"),
                                      model_config=cfg.model_dump(), manifest={"tenant": ALPHA})
    alpha, beta = _c(control, ALPHA, timeout=300), _c(control, BETA)
    t0 = time.monotonic()
    resp = alpha.post("/v1/serve/apps", json={"name": "cached", "model_name": "sec-gpt", "model_version": mv.version})
    assert resp.status_code == 201, resp.text
    print(f"tenant app deployed through the control API in {time.monotonic() - t0:.1f}s")
    app = f"{ALPHA}.cached"
    url = f"http://127.0.0.1:{serve_http_port}/t/{ALPHA}/cached/v1/completions"
    body = {"model": "sec-gpt", "prompt": "def main():", "max_tokens": 4, "temperature": 0}

    def ask(who: str | None, **headers) -> httpx.Response:
        if who:
            headers["Authorization"] = f"Bearer {control['keys'][who]}"
        return httpx.post(url, json=body, headers=headers, timeout=60)

    try:
        # Serve's port is reachable without the control API: the app itself checks factory keys and its owner.
        assert ask(None).status_code == 401
        assert ask(None, **{"X-Tenant": ALPHA}).status_code == 401  # a header's word is not enough
        assert ask(BETA).status_code == 403  # a valid key of another tenant
        first, second = ask(ALPHA), ask(ALPHA)
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert second.json()["system_fingerprint"].endswith("+exact-cache")
        assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]

        info = alpha.get(f"/v1/serve/apps/{app}/cache")
        assert info.status_code == 200, info.text
        assert info.json()["tenant"] == ALPHA and info.json()["exact"]["entries"] >= 1
        assert info.json()["exact"]["hits"] >= 1
        # another tenant can neither read nor flush it; a tenant cannot name another tenant's entries
        assert beta.get(f"/v1/serve/apps/{app}/cache").status_code == 404
        assert beta.delete(f"/v1/serve/apps/{app}/cache").status_code == 404
        assert alpha.get(f"/v1/serve/apps/{app}/cache", params={"tenant": BETA}).status_code == 404
        assert audit.query(home, action="serve.cache_flush", target=app) == []

        flushed = alpha.delete(f"/v1/serve/apps/{app}/cache")
        assert flushed.status_code == 200, flushed.text
        after = ask(ALPHA)
        assert after.status_code == 200 and not after.json()["system_fingerprint"].endswith("-cache")
        assert after.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert len(audit.query(home, action="serve.cache_flush", target=app)) == 1
    finally:
        assert beta.delete(f"/v1/serve/apps/{app}").status_code == 404
        gone = alpha.delete(f"/v1/serve/apps/{app}")
        assert gone.status_code == 200, gone.text
    assert len(audit.query(home, action="serve.delete", target=app)) == 1
    assert len(audit.query(home, action="serve.deploy", target=app)) == 1


def test_tenant_cli_goes_through_the_control_api(control, jobs, tmp_path):
    """A tenant's machine: no cluster token, only AIFACTORY_API_URL/KEY. The real `factory` CLI reaches the
    cluster through the control API and sees only its own tenant's audit entries, costs and apps."""
    import os

    from tests.integration.conftest import run_factory

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIFACTORY_"))}
    env.update(AIFACTORY_HOME=str(tmp_path / "tenant-home"), AIFACTORY_API_URL=control["url"],
               AIFACTORY_API_KEY=control["keys"][ALPHA])

    def factory(*args: str, check: bool = True):
        return run_factory(*args, env=env, check=check, timeout=120)

    entries = json.loads(factory("audit", "--format", "json").stdout)
    assert entries and {e["tenant"] for e in entries} == {ALPHA}
    rows = json.loads(factory("costs", "--by", "job", "--format", "json").stdout)
    assert all(r.get("tenant") == ALPHA for r in rows)
    apps = json.loads(factory("serve", "status", "--format", "json").stdout)
    assert all(a["tenant"] == ALPHA for a in apps)
    for args in (("serve", "cache", f"{BETA}.chat"), ("serve", "promote", "--app", f"{BETA}.chat"),
                 ("serve", "cache", "--flush", f"{ALPHA}.chat", "--tenant", BETA)):
        proc = factory(*args, check=False)
        # 404 alike for another tenant's app and for one that does not exist: one line, no traceback
        assert proc.returncode != 0 and proc.stderr.lower().startswith("error: no "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_fuzz_published_spec_finds_no_5xx_and_no_cross_tenant_read(control, jobs):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    spec = httpx.get(f"{control['url']}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    # Reads and the rollout verbs: fuzzing submissions would run random shell commands on the cluster, and
    # key rotation would revoke the key the fuzz itself uses.
    reads = schema.include(method="GET")
    rollouts = schema.include(path_regex=r"^/v1/serve/apps/\{app\}/")
    headers = {"Authorization": f"Bearer {control['keys'][ALPHA]}"}
    forbidden = (jobs[BETA], "secret of sec-beta", f'"tenant":"{BETA}"', f'"tenant": "{BETA}"')
    calls = {"n": 0, "by_status": {}}

    def check(case, resp):
        calls["n"] += 1
        calls["by_status"][resp.status_code] = calls["by_status"].get(resp.status_code, 0) + 1
        assert resp.status_code < 500, f"{case.method} {case.formatted_path} {case.query} -> {resp.status_code}: {resp.text}"
        assert not any(s in resp.text for s in forbidden), f"cross-tenant read: {case.method} {case.formatted_path}"

    def send(http, case, extra):
        # Sent with httpx: schemathesis' own `requests` transport trips over urllib3-future in this venv.
        kw = case.as_transport_kwargs(base_url=control["url"], headers=extra)
        body = {"json": kw["json"]} if "json" in kw else {"content": kw["data"]} if "data" in kw else {}
        try:
            return http.request(kw["method"], kw["url"], headers=kw["headers"], params=kw.get("params"), **body)
        except (httpx.LocalProtocolError, UnicodeEncodeError):
            return None  # a header the client itself cannot encode never reaches the server

    t0 = time.monotonic()
    with httpx.Client(timeout=60) as http:
        for sub, as_alpha in ((reads, True), (reads, False), (rollouts, True)):
            for result in sub.get_all_operations():
                op = result.ok()

                @given(case=op.as_strategy())
                @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    resp = send(http, case, headers if as_alpha else None)
                    if resp is not None:
                        check(case, resp)

                run()
    print(f"fuzz: {calls['n']} requests in {time.monotonic() - t0:.1f}s, by status {calls['by_status']}")
    assert calls["n"] >= 100 and calls["by_status"].get(200, 0) > 0


def test_quota_refuses_work_the_same_way_through_every_door(control, ray_driver):
    """A tenant with a CPU quota of 2 asks for 3 through the CLI (submit and train), the SDK, the control
    API and ``run_training`` from Python: the same one-line refusal everywhere, nothing started, nothing
    recorded."""
    from pathlib import Path

    from aifactory.exceptions import QuotaExceeded
    from aifactory.home import FactoryHome
    from aifactory.jobs import Client
    from aifactory.security.apikeys import KeyStore
    from aifactory.recipes import build_job
    from aifactory.train.runner import run_training
    from aifactory.workloads import list_records
    from tests.integration.conftest import run_factory

    tenant = "door-gamma"
    cluster = ray_driver
    home = FactoryHome.from_env(cluster.home)
    expected = (f"QuotaExceeded(tenant='{tenant}', lane='factory', pool='all', resource='CPU', requested=3, "
                "held=0, limit=2)")
    run_factory("costs", "set-quota", tenant, "--cpu", "2", home=cluster.home, env=cluster.env())
    try:
        for args in (["submit", "--tenant", tenant, "--num-cpus", "3", "--", "python", "-c", "1"],
                     ["train", "--recipe", "tiny", "--workers", "3", "--tenant", tenant]):
            proc = run_factory(*args, home=cluster.home, env=cluster.env(), check=False)
            assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        with pytest.raises(QuotaExceeded) as err:
            Client(address=cluster.dashboard_url, tenant=tenant, home=home).submit(["python", "-c", "1"], num_cpus=3)
        assert expected in str(err.value)
        key = KeyStore(home).create(tenant=tenant, name="door-test").secret
        resp = httpx.post(f"{control['url']}/v1/jobs", json={"entrypoint": "python -c 1", "num_cpus": 3},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert resp.status_code == 429 and expected in resp.json()["error"]["message"], resp.text
        with pytest.raises(QuotaExceeded) as err:
            run_training(build_job(recipe="tiny", config=None, workers=3, tenant=tenant), home=home)
        assert expected in str(err.value)
        from aifactory import audit

        # Every refusal is in the audit chain (the control API's, the CLI's, the SDK's and the trainer's).
        denials = [e for e in audit.query(home, tenant=tenant) if e.detail.get("phase") == "denied"]
        assert len(denials) == 5 and all(expected in e.detail["error"] for e in denials)
        # Within the quota, the same doors let work through (the meter is fresh, the tenant holds nothing).
        job = Client(address=cluster.dashboard_url, tenant=tenant, home=home).submit(["python", "-c", "1"],
                                                                                     num_cpus=2)
        assert [r.refs.get("submission_id") for r in list_records(home, tenant=tenant)] == [job]
        # `factory train` is admitted before its driver connects: the refused run left no driver job behind,
        # and no job of the tenant exists but the admitted submission.
        jobs = Client(address=cluster.dashboard_url, home=home).list(tenant=tenant)
        assert {j.id for j in jobs} == {job}, [(j.id, j.type) for j in jobs]
    finally:
        (Path(cluster.home) / "budgets.yaml").unlink(missing_ok=True)
