"""The attack probe (issue 22): two tenants' keys against the session cluster's control API and a shared
serving app. Every route read from the control API's own OpenAPI spec (so new routes are probed too) gets
unauthenticated, bad-key, cross-tenant, spoofed-tenant and malformed calls (deep JSON, lone surrogates, NUL
bytes, path traversal in names, huge numbers, oversized bodies).

Unacceptable: any 5xx; a 2xx where a refusal was due (an authenticated route without a valid key, another
tenant's thing, a malformed request); a 2xx whose body carries the other tenant's secrets. The test counts
probes and unacceptable answers, prints them, and fails on any unacceptable one."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

ALPHA, BETA = "pr-alpha", "pr-beta"
SHARED = "pr-shared"
SECRET = f"secret of {BETA}"
TRAVERSAL = ("..%2Fcluster%2Fcluster.json", "..%2Faudit.sqlite", "a%00b", "..", "%2E%2E", "a%ED%A0%80b")
MALFORMED = [  # (what, raw body)
    ("deep JSON", b'{"name": ' + b"[" * 1200 + b"]" * 1200 + b"}"),
    ("lone surrogate", b'{"name": "x\\ud800", "model_name": "m\\udfff", "entrypoint": "echo \\ud800"}'),
    ("NUL byte", b'{"name": "a\\u0000", "model_name": "../audit.sqlite\\u0000", "entrypoint": "echo \\u0000"}'),
    ("path traversal", b'{"name": "../x", "model_name": "../cluster/cluster.json", "model_version": "../v1"}'),
    ("huge numbers", b'{"num_cpus": 1e400, "percent": 1e400, "grace_s": 100000000000000000000000, '
                     b'"model_version": "v99999999999999999999", "entrypoint": "", "memory_bytes": -1e400}'),
    ("not JSON", b"\xff\xfe{{{"),
    ("oversized", b'{"entrypoint": "' + b"x" * (3 << 20) + b'"}'),
]


@pytest.fixture(scope="module")
def probe(control_api, factory_cluster, tmp_path_factory):
    """Keys of two tenants, a finished job of beta's, and a tiny shared completions app with factory keys."""
    import torch

    from aifactory.home import FactoryHome
    from aifactory.models.gpt import GPT, GPTConfig
    from aifactory.registry import ModelRegistry
    from aifactory.serve import deploy
    from aifactory.serve.config import CompletionsArgs
    from tests.integration.conftest import TINY_TENANT_APPS

    home = FactoryHome.from_env(control_api.home)
    keys = {ALPHA: control_api.key(ALPHA, "probe"), BETA: control_api.key(BETA, "probe")}
    beta = httpx.Client(base_url=control_api.url, headers={"Authorization": f"Bearer {keys[BETA]}"}, timeout=60)
    job = beta.post("/v1/jobs", json={"entrypoint": f"python -c \"print('{SECRET}')\"", "num_cpus": 0.1})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    beta_key_id = beta.get("/v1/whoami").json()["key_id"]

    cfg = GPTConfig(seq_len=256, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    path = tmp_path_factory.mktemp("probe") / "gpt.pt"
    torch.manual_seed(0)
    torch.save(GPT(cfg).state_dict(), path)
    mv = ModelRegistry(home).register("prgpt", weights_path=str(path), model_config=cfg.model_dump(),
                                      manifest={"tenant": "pr-ops"})
    rest = deploy.ServeREST(factory_cluster.dashboard_url, lock_dir=home.root / "serve" / "locks")
    model = getattr(mv, "qualified_name", mv.name)
    args = CompletionsArgs.model_validate({**TINY_TENANT_APPS, "model_name": model, "model_version": mv.version,
                                           "home": str(home.root), "auth": "factory-keys"})
    deploy.deploy(rest, deploy.completions_entry(args, name=SHARED, route_prefix=f"/{SHARED}"), wait_s=240)
    deadline = time.monotonic() + 120
    while beta.get(f"/v1/jobs/{job_id}").json().get("status") not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "beta's job did not finish"
        time.sleep(1)
    yield {"keys": keys, "job_id": job_id, "beta_key_id": beta_key_id, "model": model,
           "app_url": f"http://127.0.0.1:{control_api.serve_port}/{SHARED}"}
    deploy.delete_app(rest, SHARED)


class Tally:
    def __init__(self, forbidden: tuple[str, ...]):
        self.n, self.bad, self.by_status, self.forbidden = 0, [], {}, forbidden

    def check(self, what: str, resp: httpx.Response | None, *, refusal_due: bool) -> None:
        if resp is None:
            return  # the client itself could not send it (e.g. an unencodable header): never reached the server
        self.n += 1
        self.by_status[resp.status_code] = self.by_status.get(resp.status_code, 0) + 1
        leak = resp.status_code < 300 and any(s in resp.text for s in self.forbidden)
        if resp.status_code >= 500 or (refusal_due and resp.status_code < 300) or leak:
            self.bad.append(f"{what} -> {resp.status_code}{' (leak)' if leak else ''}: {resp.text[:200]}")


def _send(http: httpx.Client, method: str, url: str, **kw) -> httpx.Response | None:
    try:
        return http.request(method, url, **kw)
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return None


def test_attack_probe_finds_nothing_unacceptable(control_api, probe):
    t0 = time.monotonic()
    keys, job_id = probe["keys"], probe["job_id"]
    alpha_h = {"Authorization": f"Bearer {keys[ALPHA]}"}
    tally = Tally((SECRET, job_id, probe["beta_key_id"], f'"tenant":"{BETA}"', f'"tenant": "{BETA}"'))
    spec = httpx.get(f"{control_api.url}/openapi.json", timeout=30).json()
    ops = [(path, method.upper(), op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(ops) >= 15, "the spec lists too few routes"
    # What beta owns, for the path parameters of cross-tenant calls; alpha's own names elsewhere.
    theirs = {"job_id": job_id, "app": f"{BETA}.chat", "key_id": probe["beta_key_id"], "tenant": BETA}
    dummy = {"job_id": "raysubmit_0000000000000000", "app": f"{ALPHA}.chat", "key_id": "0000000000000000",
             "tenant": ALPHA}

    def fill(path: str, values: dict[str, str]) -> str:
        return re.sub(r"\{([^}]+)\}", lambda m: values.get(m.group(1), "x"), path)

    with httpx.Client(base_url=control_api.url, timeout=60) as http:
        for path, method, op in ops:
            secured = bool(op.get("security"))
            body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            for label, headers in (("no key", {}), ("bad key", {"Authorization": "Bearer aifk_0000000000000000_" + "x" * 43}),
                                   ("basic auth", {"Authorization": "Basic eDp5"})):
                tally.check(f"{label}: {method} {path}", _send(http, method, fill(path, dummy), headers=headers, **body),
                            refusal_due=secured)
            # Cross-tenant: alpha's key on beta's things; any write there must be refused.
            cross = fill(path, theirs)
            if cross != path:  # a route with a path parameter names beta's thing
                tally.check(f"cross-tenant: {method} {cross}",
                            _send(http, method, cross, headers=alpha_h, **body), refusal_due=method != "GET")
                tally.check(f"cross-tenant spoofed: {method} {cross}",
                            _send(http, method, cross, headers={**alpha_h, "X-Tenant": BETA}, **body),
                            refusal_due=method != "GET")
            if method == "GET":  # reads filtered by tenant: beta named as a query parameter or as a header
                tally.check(f"cross-tenant query: GET {path}",
                            _send(http, "GET", fill(path, dummy), headers={**alpha_h, "X-Tenant": BETA},
                                  params={"tenant": BETA}), refusal_due=False)
            # Path traversal, NUL and invalid UTF-8 in every path parameter.
            if "{" in path:
                for bad in TRAVERSAL:
                    url = fill(path, {k: bad for k in ("job_id", "app", "key_id", "tenant")})
                    tally.check(f"bad name {bad!r}: {method} {url}",
                                _send(http, method, url, headers=alpha_h, **body), refusal_due=True)
            # Malformed bodies on every route that takes one.
            if method in ("POST", "PUT", "PATCH"):
                for what, raw in MALFORMED:
                    tally.check(f"{what}: {method} {path}",
                                _send(http, method, fill(path, dummy), content=raw,
                                      headers={**alpha_h, "Content-Type": "application/json"}), refusal_due=True)
            for q in ("%00", "%ED%A0%80", "9" * 400):
                tally.check(f"bad query {q[:8]}: {method} {path}",
                            _send(http, method, fill(path, dummy) + f"?tenant={q}&since={q}&limit={q}&action={q}",
                                  headers=alpha_h, **body), refusal_due=method != "GET")

    # The shared serving app: a factory key on every route, the key (not a header) names the tenant.
    app, model = probe["app_url"], probe["model"]
    ok_body = {"model": model, "prompt": "def f():", "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        routes = [("GET", "/v1/models"), ("GET", "/v1/status"), ("POST", "/v1/completions"),
                  ("POST", "/batch/v1/completions")]
        for method, route in routes:
            kw = {"json": ok_body} if method == "POST" else {}
            for label, headers in (("no key", {}), ("X-Tenant alone", {"X-Tenant": BETA}),
                                   ("bad key", {"Authorization": "Bearer aifk_0000000000000000_" + "y" * 43}),
                                   ("spoofed tenant", {**alpha_h, "X-Tenant": BETA})):
                tally.check(f"app {label}: {method} {route}", _send(http, method, app + route, headers=headers, **kw),
                            refusal_due=True)
            tally.check(f"app own key: {method} {route}", _send(http, method, app + route, headers=alpha_h, **kw),
                        refusal_due=False)
        status = http.get(app + "/v1/status", headers=alpha_h).json()
        assert status["tenant"] == ALPHA and "prefix_cache_hit_ratio" not in str(status)
        for field, value in (("seed", 2 ** 70), ("temperature", 1e-300), ("temperature", -1), ("max_tokens", 10 ** 30),
                             ("top_p", 1e400), ("prompt", "x\ud800"), ("prompt", "a\x00b"), ("prompt", "x" * 3_000_000)):
            raw = json.dumps({**ok_body, field: value}).encode() if field != "top_p" else \
                ('{"model": "%s", "prompt": "a", "top_p": 1e400}' % model).encode()  # \ud800 escaped: lone
            tally.check(f"app malformed {field}={str(value)[:12]}",
                        _send(http, "POST", app + "/v1/completions", content=raw,
                              headers={**alpha_h, "Content-Type": "application/json"}), refusal_due=False)
        for what, raw in MALFORMED:
            tally.check(f"app {what}", _send(http, "POST", app + "/v1/completions", content=raw,
                                             headers={**alpha_h, "Content-Type": "application/json"}),
                        refusal_due=True)
        # An exact-cache tag never tells alpha what beta asked: beta's cached answer is not alpha's hit.
        beta_h = {"Authorization": f"Bearer {keys[BETA]}"}
        secret_prompt = {**ok_body, "prompt": "beta's private question"}
        http.post(app + "/v1/completions", json=secret_prompt, headers=beta_h)
        mine = http.post(app + "/v1/completions", json=secret_prompt, headers=alpha_h)
        tally.n += 1
        if mine.status_code != 200 or mine.json()["system_fingerprint"].endswith("-cache"):
            tally.bad.append(f"cross-tenant cache hit: {mine.status_code} {mine.text[:200]}")

    elapsed = time.monotonic() - t0
    print(f"attack probe: {tally.n} probes over {len(ops)} control routes + {len(routes)} app routes in "
          f"{elapsed:.1f}s, {len(tally.bad)} unacceptable; by status {dict(sorted(tally.by_status.items()))}")
    for line in tally.bad:
        print("  UNACCEPTABLE", line)
    assert tally.n >= 300
    assert not tally.bad, f"{len(tally.bad)} of {tally.n} probes got an unacceptable answer"
