"""The control API's authorization rules, without Ray: every route refuses unauthenticated calls, a tenant
sees only its own keys, audit entries, costs and budgets (others' answer 404 or are absent), admins see all.
Routes that need the cluster (jobs, serving) are exercised in tests/integration/test_security.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aifactory import audit
from aifactory.control.app import create_app, openapi_spec
from aifactory.home import FactoryHome
from aifactory.security.apikeys import KeyStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path):
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    store = KeyStore(home)
    keys = {
        "alpha": store.create(tenant="alpha", actor="ops").secret,
        "beta": store.create(tenant="beta", actor="ops").secret,
        "admin": store.create(tenant=None, role="admin", actor="ops").secret,
    }
    client = TestClient(create_app(home, address="http://127.0.0.1:9"), raise_server_exceptions=False)
    return home, client, keys


def _h(key):
    return {"Authorization": f"Bearer {key}"}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_refuses_missing_and_bad_keys(env):
    _, client, _ = env
    spec = openapi_spec()
    assert len(spec["paths"]) >= 10
    for path, ops in spec["paths"].items():
        for method in ops:
            for headers in ({}, _h("aifk_0123456789abcdef_" + "A" * 43), {"Authorization": "Basic eDp5"}):
                resp = client.request(method.upper(), _concrete(path), headers=headers, json={})
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.json()["error"]["code"] == "unauthenticated"
                assert resp.headers["www-authenticate"] == "Bearer"


def test_whoami_and_revoked_key(env):
    home, client, keys = env
    me = client.get("/v1/whoami", headers=_h(keys["alpha"])).json()
    assert me["tenant"] == "alpha" and me["role"] == "tenant"
    KeyStore(home).revoke(me["key_id"])
    assert client.get("/v1/whoami", headers=_h(keys["alpha"])).status_code == 401


def test_keys_are_scoped_and_cross_tenant_answers_404(env):
    home, client, keys = env
    alpha_keys = client.get("/v1/keys", headers=_h(keys["alpha"])).json()
    assert {k["tenant"] for k in alpha_keys} == {"alpha"}
    # asking for another tenant's keys shows nothing
    assert client.get("/v1/keys?tenant=beta", headers=_h(keys["alpha"])).json() == alpha_keys
    beta_id = client.get("/v1/whoami", headers=_h(keys["beta"])).json()["key_id"]
    for method, path, body in (("POST", f"/v1/keys/{beta_id}/rotate", {}), ("DELETE", f"/v1/keys/{beta_id}", None)):
        resp = client.request(method, path, headers=_h(keys["alpha"]), json=body)
        unknown = client.request(method, path.replace(beta_id, "0123456789abcdef"), headers=_h(keys["alpha"]),
                                 json=body)
        assert resp.status_code == unknown.status_code == 404
        assert resp.json()["error"]["message"].replace(beta_id, "X") == \
            unknown.json()["error"]["message"].replace("0123456789abcdef", "X")
    assert client.get("/v1/whoami", headers=_h(keys["beta"])).status_code == 200  # untouched
    # only admins issue keys
    assert client.post("/v1/keys", headers=_h(keys["alpha"]), json={"tenant": "alpha"}).status_code == 403
    issued = client.post("/v1/keys", headers=_h(keys["admin"]), json={"tenant": "gamma", "name": "svc"})
    assert issued.status_code == 201 and issued.json()["key"].startswith("aifk_")
    assert client.get("/v1/whoami", headers=_h(issued.json()["key"])).json()["tenant"] == "gamma"
    assert len(client.get("/v1/keys", headers=_h(keys["admin"])).json()) == 4


def test_tenant_rotates_its_own_key_through_the_api(env):
    home, client, keys = env
    me = client.get("/v1/whoami", headers=_h(keys["alpha"])).json()
    new = client.post(f"/v1/keys/{me['key_id']}/rotate", headers=_h(keys["alpha"]), json={}).json()
    assert client.get("/v1/whoami", headers=_h(keys["alpha"])).status_code == 401
    assert client.get("/v1/whoami", headers=_h(new["key"])).json()["tenant"] == "alpha"
    rotations = audit.query(home, action="key.rotate")
    assert len(rotations) == 1 and rotations[0].actor == f"apikey:{me['key_id']}"


def test_audit_is_scoped_to_the_tenant(env):
    home, client, keys = env
    audit.record(home, actor="x", action="job.submit", target="j-alpha", tenant="alpha")
    audit.record(home, actor="x", action="job.submit", target="j-beta", tenant="beta")
    mine = client.get("/v1/audit", headers=_h(keys["alpha"])).json()
    assert {e["tenant"] for e in mine} == {"alpha"} and "j-beta" not in json.dumps(mine)
    assert client.get("/v1/audit?tenant=beta", headers=_h(keys["alpha"])).json() == mine
    every = client.get("/v1/audit", headers=_h(keys["admin"])).json()
    assert {"j-alpha", "j-beta"} <= {e["target"] for e in every}
    bad = client.get("/v1/audit?since=whenever", headers=_h(keys["alpha"]))
    assert bad.status_code == 422 and bad.json()["error"]["fields"] == ["since"]


def test_budgets_and_costs_are_scoped_and_changes_audited_once(env):
    home, client, keys = env
    limits = {"budget": {"period": "month", "soft_usd": 1, "hard_usd": 2}, "quota": {"cpu": 2}}
    assert client.put("/v1/budgets/alpha", headers=_h(keys["alpha"]), json=limits).status_code == 403
    for tenant in ("alpha", "beta"):
        assert client.put(f"/v1/budgets/{tenant}", headers=_h(keys["admin"]), json=limits).status_code == 200
    same = client.put("/v1/budgets/alpha", headers=_h(keys["admin"]), json=limits)  # no change: no new entry
    assert same.status_code == 200
    changes = [(e.action, e.target) for e in audit.query(home) if e.action.endswith(".set")]
    assert changes == [("budget.set", "alpha"), ("quota.set", "alpha"), ("budget.set", "beta"), ("quota.set", "beta")]
    mine = client.get("/v1/budgets", headers=_h(keys["alpha"])).json()
    assert [r["tenant"] for r in mine] == ["alpha"]
    assert client.get("/v1/budgets?tenant=beta", headers=_h(keys["alpha"])).json() == mine
    assert {r["tenant"] for r in client.get("/v1/budgets", headers=_h(keys["admin"])).json()} == {"alpha", "beta"}
    bad = client.put("/v1/budgets/alpha", headers=_h(keys["admin"]), json={"budget": {"hard_usd": -1}})
    assert bad.status_code == 422 and any("hard_usd" in f for f in bad.json()["error"]["fields"])
    costs = client.get("/v1/costs?by=project", headers=_h(keys["alpha"]))
    assert costs.status_code == 200 and all(r["tenant"] == "alpha" for r in costs.json())
    assert client.get("/v1/costs?by=nonsense", headers=_h(keys["alpha"])).status_code == 422


def test_job_submission_body_rules(env):
    _, client, keys = env
    # the tenant comes from the key: naming another is refused before anything reaches the cluster
    resp = client.post("/v1/jobs", headers=_h(keys["alpha"]), json={"entrypoint": "echo", "tenant": "beta"})
    assert resp.status_code == 403 and "own tenant" in resp.json()["error"]["message"]
    resp = client.post("/v1/jobs", headers=_h(keys["admin"]), json={"entrypoint": "echo"})
    assert resp.status_code == 422 and resp.json()["error"]["fields"] == ["tenant"]
    resp = client.post("/v1/jobs", headers=_h(keys["alpha"]), json={"entrypoint": "", "runtime_env": {}})
    assert resp.status_code == 422 and set(resp.json()["error"]["fields"]) == {"body.entrypoint", "body.runtime_env"}


def test_serving_routes_refuse_other_tenants_apps_before_touching_serve(env):
    _, client, keys = env
    for path in ("/v1/serve/apps/beta.chat/rollback", "/v1/serve/apps/beta.chat/promote", "/v1/serve/apps/ops/rollback"):
        resp = client.post(path, headers=_h(keys["alpha"]))
        assert resp.status_code == 404, (path, resp.text)
    resp = client.post("/v1/serve/apps/beta.chat/canary", headers=_h(keys["alpha"]),
                       json={"model_version": "v1", "percent": 10})
    assert resp.status_code == 404


def test_published_openapi_spec_is_current():
    published = json.loads((REPO / "serve_apps/control.openapi.json").read_text())
    assert published == json.loads(json.dumps(openapi_spec())), \
        "regenerate it: factory control openapi --out serve_apps/control.openapi.json"
