"""Registration as a service on the session cluster (issue 22.2): a tenant's job, launched through the control
API, registers a model while claiming another tenant; the control plane stamps the submitter's tenant, in the
submitter's namespace, signed; the other tenant's "newest" never resolves to it; the job's credential dies
with the job. One tiny job (seconds), on the session's `factory up` cluster and control API."""

from __future__ import annotations

import base64
import json
import textwrap
import time

import httpx
import pytest

A, B = "rg-alpha", "rg-beta"
MODEL = "rg-gpt"

JOB = textwrap.dedent(f'''
    import base64, json, os, tempfile, urllib.error, urllib.request
    from aifactory.home import FactoryHome
    from aifactory.registry.service import Registration

    reg = Registration.from_env()
    path = os.path.join(tempfile.mkdtemp(), "weights.pt")
    open(path, "wb").write(b"\x07" * 4096)  # the bytes of a weights file (the service does not unpickle them)
    out = {{"token": reg.token, "url": reg.url,
           "public_key_env": bool(os.environ.get("AIFACTORY_SIGNING_PUBLIC_KEY"))}}
    # what `python -m jobs.train --tenant {B}` does at each validated checkpoint (train.loop._register)
    mv = reg.registrar(FactoryHome.from_env(), tenant="{B}").register(
        "{MODEL}", weights_path=path, model_config={{"d": 1}}, manifest={{"tenant": "{B}", "run_id": "r-claims-b"}})
    out["registered"] = mv.to_dict()
    # naming the other tenant outright is refused
    meta = base64.urlsafe_b64encode(json.dumps({{"name": "{MODEL}", "model_config": {{}}, "manifest": {{}},
                                                 "tenant": "{B}"}}).encode()).decode()
    req = urllib.request.Request(reg.url + "/v1/models/register", data=open(path, "rb").read(), method="POST",
                                 headers={{"Content-Type": "application/octet-stream", "X-Aifactory-Registration": meta,
                                          "Authorization": "Bearer " + reg.token}})
    try:
        urllib.request.urlopen(req, timeout=60)
        out["as_other_tenant"] = 201
    except urllib.error.HTTPError as err:
        out["as_other_tenant"] = err.code
    print("RESULT " + json.dumps(out))
''')


def _client(control_api, key: str) -> httpx.Client:
    return httpx.Client(base_url=control_api.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _meta(**fields) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def claimed(control_api, tmp_path_factory):
    """Tenant A's job (through POST /v1/jobs) registering while claiming to be B; its RESULT line."""
    script = tmp_path_factory.mktemp("rg") / "job.py"
    script.write_text(JOB)
    keys = {t: control_api.key(t, name="rg-test") for t in (A, B)}
    a = _client(control_api, keys[A])
    t0 = time.monotonic()
    resp = a.post("/v1/jobs", json={"entrypoint": f"python {script}", "num_cpus": 0.1})
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = a.get(f"/v1/jobs/{job_id}").json()["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    logs = a.get(f"/v1/jobs/{job_id}/logs").json()["logs"]
    print(f"job {job_id} {status} in {time.monotonic() - t0:.1f}s")
    assert status == "SUCCEEDED", logs[-3000:]
    line = next(l for l in logs.splitlines() if l.startswith("RESULT "))
    return {"keys": keys, "job_id": job_id, **json.loads(line[len("RESULT "):])}


def test_a_job_registers_as_its_submitter_whatever_it_claims(claimed, control_api):
    from aifactory import audit
    from aifactory.home import FactoryHome
    from aifactory.registry import ModelRegistry

    home = FactoryHome.from_env(control_api.home)
    got = claimed["registered"]
    assert (got["tenant"], got["manifest"]["tenant"], got["name"]) == (A, A, MODEL)
    assert claimed["as_other_tenant"] == 403
    assert claimed["public_key_env"]  # factory up hands every Ray process the control plane's public key
    mv = ModelRegistry(home, tenant=A).get(MODEL, got["version"])
    ModelRegistry(home).verify(mv)  # signed by the control plane's key, weights intact
    with pytest.raises(Exception, match="not found|no servable"):
        ModelRegistry(home, tenant=B).get(MODEL)
    entry = [e for e in audit.query(home, action="model.register") if e.target == f"{A}/{MODEL}:{got['version']}"]
    assert entry and entry[0].tenant == A and entry[0].actor == f"job:{claimed['job_id']}"
    assert entry[0].detail["claimed_tenant"] == B


def test_the_other_tenants_deploy_never_serves_those_weights(claimed, control_api):
    from aifactory.home import FactoryHome
    from aifactory.registry import ModelRegistry

    b = _client(control_api, claimed["keys"][B])
    a_version = claimed["registered"]["version"]
    for version in (None, a_version):  # "the newest", and A's version by number
        resp = b.post("/v1/serve/apps", json={"name": "rg", "model_name": MODEL, "model_version": version})
        assert resp.status_code == 404, resp.text
    # B's own version of the same name lives in B's namespace, numbered there; B's "newest" is it
    mine = b.post("/v1/models/register", content=b"\x01" * 4096, headers={
        "Content-Type": "application/octet-stream", "X-Aifactory-Registration": _meta(
            name=MODEL, model_config={"d": 1}, manifest={"run_id": "b-own"})})
    assert mine.status_code == 201, mine.text
    assert (mine.json()["tenant"], mine.json()["version"]) == (B, "v1")
    newest = ModelRegistry(FactoryHome.from_env(control_api.home), tenant=B).get(MODEL)
    assert newest.sha256 == mine.json()["sha256"] != claimed["registered"]["sha256"]
    assert [m["tenant"] for m in b.get("/v1/models").json()] == [B]


def test_the_grant_dies_with_its_job(claimed, control_api):
    resp = httpx.post(f"{control_api.url}/v1/models/register", content=b"\x02" * 64, timeout=60, headers={
        "Authorization": f"Bearer {claimed['token']}", "Content-Type": "application/octet-stream",
        "X-Aifactory-Registration": _meta(name=MODEL, model_config={}, manifest={})})
    assert resp.status_code == 401 and "SUCCEEDED" in resp.json()["error"]["message"]
