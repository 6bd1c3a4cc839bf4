"""20 concurrent Serve changes (deploys, canaries, cache flushes) from 4 tenants through the control API: each
one either took effect, as the resulting Serve state shows, or was refused with 409 naming the conflict; none
is silently lost (issue 22.5). Tiny apps on the session cluster's control API (conftest.control_api)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

TENANTS = ("cc-a", "cc-b", "cc-c", "cc-d")
SHARED = "cc-shared"  # an operators' app: every tenant's answers are cached (and flushed) there


@pytest.fixture(scope="module")
def setup(control_api, factory_cluster, tmp_path_factory):
    """Keys and a tiny registered model (v1, v2) per tenant; cc-a's app and the operators' shared app running."""
    import torch

    from aifactory.home import FactoryHome
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.registry import ModelRegistry
    from aifactory.serve import deploy
    from aifactory.serve.config import CompletionsArgs
    from tests.integration.conftest import TINY_TENANT_APPS

    home = FactoryHome.from_env(control_api.home)
    cfg = GPTConfig(seq_len=256, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    path = tmp_path_factory.mktemp("cc") / "gpt.pt"
    torch.manual_seed(0)
    torch.save(GPT(cfg).state_dict(), path)
    reg = ModelRegistry(home)
    versions = {t: [reg.register("ccgpt", weights_path=str(path), model_config=cfg.model_dump(),
                                 manifest={"tenant": t}) for _ in range(2)] for t in TENANTS}
    keys = {t: control_api.key(t, name="cc-test") for t in TENANTS}
    rest = deploy.ServeREST(factory_cluster.dashboard_url, lock_dir=home.root / "serve" / "locks")
    shared = reg.register("ccshared", weights_path=str(path), model_config=cfg.model_dump(),
                          manifest={"tenant": "cc-ops"})
    shared_args = CompletionsArgs.model_validate({**TINY_TENANT_APPS, "model_name": getattr(
        shared, "qualified_name", shared.name), "model_version": shared.version, "home": str(home.root)})
    t0 = time.monotonic()
    deploy.deploy(rest, deploy.completions_entry(shared_args, name=SHARED, route_prefix=f"/{SHARED}"), wait_s=240)
    a = _client(control_api, keys["cc-a"], timeout=300)
    resp = a.post("/v1/serve/apps", json={"name": "base", "model_name": "ccgpt",
                                          "model_version": versions["cc-a"][0].version})
    assert resp.status_code == 201, resp.text
    print(f"setup: 2 apps up in {time.monotonic() - t0:.1f}s")
    yield {"keys": keys, "versions": versions, "rest": rest}
    for app in (SHARED, "cc-a.base", "cc-b.chat", "cc-c.chat"):
        deploy.delete_app(rest, app)


def _client(control_api, key: str, timeout: float = 300) -> httpx.Client:
    return httpx.Client(base_url=control_api.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def test_concurrent_changes_all_take_effect_or_get_409(control_api, setup):
    keys, versions, rest = setup["keys"], setup["versions"], setup["rest"]
    base = f"http://127.0.0.1:{control_api.serve_port}/{SHARED}/v1/completions"
    prompt = {"model": "ccshared", "prompt": "def f():", "max_tokens": 2, "temperature": 0}

    def ask_shared(tenant: str) -> httpx.Response:
        return httpx.post(base, json={**prompt, "model": rest_model(rest)}, headers={"X-Tenant": tenant}, timeout=60)

    for t in TENANTS:  # one cached answer per tenant in the shared app, to be flushed below
        assert ask_shared(t).status_code == 200
        assert ask_shared(t).json()["system_fingerprint"].endswith("+exact-cache")

    v2 = {t: versions[t][1].version for t in TENANTS}
    calls = [
        # (tenant, method, path, body)
        ("cc-a", "POST", "/v1/serve/apps/cc-a.base/canary", {"model_version": v2["cc-a"], "percent": 10}),
        ("cc-a", "POST", "/v1/serve/apps/cc-a.base/canary", {"model_version": v2["cc-a"], "percent": 30}),
        ("cc-a", "DELETE", "/v1/serve/apps/cc-a.base/cache", None),
        ("cc-a", "DELETE", "/v1/serve/apps/cc-a.base/cache", None),
        ("cc-a", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-b", "POST", "/v1/serve/apps", {"name": "chat", "model_name": "ccgpt", "model_version": versions["cc-b"][0].version}),
        ("cc-b", "POST", "/v1/serve/apps", {"name": "chat", "model_name": "ccgpt", "model_version": versions["cc-b"][0].version}),
        ("cc-b", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-b", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-b", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-c", "POST", "/v1/serve/apps", {"name": "chat", "model_name": "ccgpt", "model_version": versions["cc-c"][0].version}),
        ("cc-c", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-c", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-c", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-c", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-d", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-d", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-d", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-d", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
        ("cc-d", "DELETE", f"/v1/serve/apps/{SHARED}/cache", None),
    ]
    assert len(calls) == 20 and {c[0] for c in calls} == set(TENANTS)

    def send(call):
        tenant, method, path, body = call
        with _client(control_api, keys[tenant]) as c:
            return c.request(method, path, json=body)

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        answers = list(pool.map(send, calls))
    elapsed = time.monotonic() - t0
    codes = [r.status_code for r in answers]
    print(f"20 concurrent changes in {elapsed:.1f}s: status codes {sorted(codes)}")

    # Each answer: it took effect (2xx) or it was refused with a 409 naming the application in conflict.
    for call, r in zip(calls, answers):
        assert r.status_code in (200, 201, 409), (call, r.status_code, r.text)
        if r.status_code == 409:
            err = r.json()["error"]
            assert err["code"] == "conflict" and err["fields"] == ["app"], r.text
            assert any(f"'{a}'" in err["message"] for a in ("cc-a.base", "cc-b.chat", "cc-c.chat", SHARED)), r.text
    assert codes.count(409) < len(codes)

    full = rest.details()
    details = full.get("applications") or {}
    # Nothing was dropped: every app that existed is still there, every deploy that answered 201 is RUNNING.
    assert details[SHARED]["status"] == "RUNNING" and details["cc-a.base"]["status"] == "RUNNING"
    for call, r in zip(calls, answers):
        if call[2] == "/v1/serve/apps" and r.status_code == 201:
            app = f"{call[0]}.{call[3]['name']}"
            assert details[app]["status"] == "RUNNING", (app, details.get(app))
            assert details[app]["route_prefix"] == f"/t/{call[0]}/{call[3]['name']}"
    assert any(r.status_code == 201 for c, r in zip(calls, answers) if c[0] == "cc-b")  # one of the two, at least

    # Canaries: the live rollout is the one of a canary that answered 200 (the later one if both did).
    from aifactory.serve import deploy

    canaries = [(c[3]["percent"], r) for c, r in zip(calls, answers) if c[2].endswith("/canary")]
    ok = [(p, r.json()) for p, r in canaries if r.status_code == 200]
    assert ok, [r.text for _, r in canaries]
    live = deploy.rollout_state(rest, "cc-a.base")
    assert live.canary_version == v2["cc-a"] and live.canary_percent in {p for p, _ in ok}

    # Flushes: each tenant's live flush token in an app is one its own successful flushes returned.
    for app in (SHARED, "cc-a.base"):
        live_flushes = deploy.target_user_config(full, app, "Ingress").get("cache_flush") or {}
        deadline = time.monotonic() + 15  # the replicas run with what the writer last PUT, once reconciled
        while deploy.live_user_config(full, app, "Ingress").get("cache_flush") != live_flushes:
            assert time.monotonic() < deadline, (app, live_flushes, deploy.live_user_config(full, app, "Ingress"))
            time.sleep(0.5)
            full = rest.details()
        for t in TENANTS:
            tokens = {r.json()["token"] for c, r in zip(calls, answers)
                      if c[0] == t and c[2] == f"/v1/serve/apps/{app}/cache" and r.status_code == 200}
            if tokens:
                assert live_flushes.get(t) in tokens, (app, t, live_flushes, tokens)
    # ... and each tenant's cached answer in the shared app is really gone.
    for t in TENANTS:
        again = ask_shared(t)
        assert again.status_code == 200 and not again.json()["system_fingerprint"].endswith("-cache"), (t, again.text)


def rest_model(rest) -> str:
    """The shared app's model name as the app serves it (``tenant/name`` where the registry namespaces)."""
    cfg = (rest.details()["applications"][SHARED].get("deployed_app_config") or {}).get("args") or {}
    return cfg["model_name"]
