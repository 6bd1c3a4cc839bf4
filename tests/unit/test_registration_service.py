"""Registration as a service, without Ray: tenant namespaces, the signature's coverage, no silent keys,
job-scoped grants, lineage checks, and the control API's registration route (its real FastAPI app)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from aifactory.exceptions import AuthenticationError, ConfigError, IntegrityError, NotFound
from aifactory.home import FactoryHome
from aifactory.registry import ModelRegistry
from aifactory.registry.service import LocalRegistrar, Registration, RegistrationGrants, register_for
from aifactory.security import signing


@pytest.fixture
def home(tmp_path) -> FactoryHome:
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    signing.create_signing_key(home)
    return home


@pytest.fixture
def weights(tmp_path) -> str:
    path = tmp_path / "w.pt"
    path.write_bytes(b"\x07" * 2048)
    return str(path)


def _reg(home, as_tenant, weights, name="gpt-tiny", **manifest):
    return register_for(home, as_tenant, name, weights_path=weights, model_config={"d": 1},
                        manifest={"run_id": None, **manifest})


# ---- no key is ever made up -------------------------------------------------------------------------

def test_signing_and_verifying_never_create_a_key(tmp_path, weights, monkeypatch):
    monkeypatch.delenv(signing.PUBLIC_KEY_ENV, raising=False)
    bare = FactoryHome.from_env(tmp_path / "worker").ensure()
    with pytest.raises(signing.SigningKeyUnavailable, match="only the control plane signs"):
        ModelRegistry(bare).register("m", weights_path=weights, model_config={}, manifest={}, tenant="a")
    with pytest.raises(signing.SigningKeyUnavailable, match=signing.PUBLIC_KEY_ENV):
        signing.public_key(bare)
    assert not (bare.root / "security" / "signing_key.pem").exists()
    assert not (bare.root / "security" / "signing_key.pub.pem").exists()
    assert ModelRegistry(bare).list() == []  # nothing was copied before the refusal


def test_a_node_verifies_with_the_public_key_it_was_given(tmp_path, home, weights, monkeypatch):
    mv = _reg(home, "a", weights)
    # A serving node with no home of its own but the control plane's public key in its environment.
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, signing.public_key_pem(home).decode())
    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path / "node"))
    node = ModelRegistry(home.registry + "/")  # a bare path whose parent is not found as a home
    node._home = FactoryHome.from_env(tmp_path / "node")
    node.verify(node.get("a/gpt-tiny", mv.version))
    # ...and refuses a version signed by any other key
    other = FactoryHome.from_env(tmp_path / "other").ensure()
    signing.create_signing_key(other)
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, signing.public_key_pem(other, from_env=False).decode())
    with pytest.raises(IntegrityError, match="signed by key"):
        node.verify(node.get("a/gpt-tiny", mv.version))


# ---- namespaces -------------------------------------------------------------------------------------

def test_each_tenant_has_its_own_namespace(home, weights):
    a1 = _reg(home, "a", weights)
    a2 = _reg(home, "a", weights)
    b1 = _reg(home, "b", weights)
    assert (a1.version, a2.version, b1.version) == ("v1", "v2", "v1")  # each namespace numbers its own
    b_view = ModelRegistry(home, tenant="b")
    assert b_view.get("gpt-tiny").tenant == "b" and b_view.get("gpt-tiny").version == "v1"
    assert [mv.tenant for mv in b_view.list()] == ["b"]
    with pytest.raises(NotFound):
        b_view.get("a/gpt-tiny")  # another tenant's model reads as absent
    with pytest.raises(NotFound):
        ModelRegistry(home, tenant="c").get("gpt-tiny")
    operator = ModelRegistry(home)
    with pytest.raises(ConfigError, match="registered by tenants a, b"):
        operator.get("gpt-tiny")  # a bare name two tenants use is ambiguous, never a guess
    assert operator.get("a/gpt-tiny").version == "v2"
    for bad in ("../a/gpt-tiny", "A/gpt-tiny", "a/../b", "a/gpt-tiny\x00"):
        with pytest.raises(NotFound):
            operator.get(bad)


def test_the_control_plane_stamps_its_tenant_over_the_manifests_claim(home, weights):
    mv = _reg(home, "a", weights, tenant="b")  # a job of tenant a claiming to be b
    assert mv.tenant == "a" and mv.manifest["tenant"] == "a"
    with pytest.raises(NotFound):
        ModelRegistry(home, tenant="b").get("gpt-tiny")


def test_a_record_copied_into_another_namespace_is_ignored(home, weights, tmp_path):
    import shutil

    mv = _reg(home, "a", weights)
    _reg(home, "b", weights)
    src = os.path.join(home.registry, "a", "gpt-tiny", mv.version)
    shutil.copytree(src, os.path.join(home.registry, "b", "gpt-tiny", "v2"))  # a job with write access
    b = ModelRegistry(home, tenant="b")
    assert [m.version for m in b.list()] == ["v1"]
    assert b.get("gpt-tiny").version == "v1"


def test_servable_and_tenant_are_covered_by_the_signature(home, weights):
    good = _reg(home, "b", weights)
    newer = _reg(home, "b", weights)
    reg = ModelRegistry(home, tenant="b")
    record = os.path.join(home.registry, "b", "gpt-tiny", newer.version, "version.json")
    reg.set_servable("gpt-tiny", newer.version, False)  # the control plane may, and re-signs
    reg.verify(reg.get("gpt-tiny", newer.version))
    assert reg.get("gpt-tiny").version == good.version
    withdrawn = json.loads(open(record).read())
    open(record, "w").write(json.dumps(withdrawn | {"servable": True}))  # a job flips it back without the key
    with pytest.raises(IntegrityError, match="bad signature"):
        reg.verify(reg.get("gpt-tiny", newer.version))
    assert reg.get("gpt-tiny").version == good.version  # "the newest servable" skips what does not verify
    relabelled = withdrawn | {"servable": True, "tenant": "a"}
    os.makedirs(os.path.join(home.registry, "a", "gpt-tiny", newer.version))
    open(os.path.join(home.registry, "a", "gpt-tiny", newer.version, "version.json"), "w").write(
        json.dumps(relabelled))  # moved into a's namespace and re-labelled: the signature names b
    with pytest.raises(IntegrityError, match="bad signature"):
        reg_a = ModelRegistry(home, tenant="a")
        reg_a.verify(reg_a.get("gpt-tiny", newer.version))


def test_lineage_must_point_into_the_same_namespace_with_its_digest(home, weights):
    a = _reg(home, "a", weights)
    with pytest.raises(ConfigError, match="manifest.parent: 'gpt-tiny:v1' is not a model version of tenant 'b'"):
        _reg(home, "b", weights, parent=a.ref, parent_sha256=a.sha256)
    with pytest.raises(ConfigError, match="manifest.parent_sha256"):
        _reg(home, "a", weights, parent=a.ref, parent_sha256="0" * 64)
    child = _reg(home, "a", weights, parent=a.ref, parent_sha256=a.sha256)
    assert child.manifest["parent"] == "gpt-tiny:v1"


def test_a_resumed_step_gets_the_version_it_registered_before(home, weights):
    first = _reg(home, "a", weights, run_id="r1", step=20)
    again = _reg(home, "a", weights, run_id="r1", step=20)
    assert first.version == again.version == "v1"
    assert _reg(home, "a", weights, run_id="r1", step=40).version == "v2"


# ---- grants -----------------------------------------------------------------------------------------

def test_grants_are_hashed_bound_to_one_job_and_expire(home):
    grants = RegistrationGrants(home)
    token = grants.issue(tenant="a", project="p", submission_id="raysubmit_1")
    g = grants.authenticate(token)
    assert (g.tenant, g.project, g.submission_id) == ("a", "p", "raysubmit_1")
    assert token.split("_")[-1].encode() not in grants.path.read_bytes()  # only a digest is stored
    assert oct(grants.path.stat().st_mode & 0o777) == "0o600"
    for bad in (None, "", "aifr_x", token[:-2] + "AA", token.replace("aifr_", "aifk_")):
        with pytest.raises(AuthenticationError):
            grants.authenticate(bad)
    expired = grants.issue(tenant="a", project="p", submission_id="raysubmit_2", ttl_s=-1)
    with pytest.raises(AuthenticationError, match="expired"):
        grants.authenticate(expired)


def test_registration_from_env(monkeypatch, home):
    monkeypatch.delenv("AIFACTORY_REGISTRATION_URL", raising=False)
    monkeypatch.delenv("AIFACTORY_REGISTRATION_TOKEN", raising=False)
    assert isinstance(Registration.from_env().registrar(home, tenant="a"), LocalRegistrar)
    monkeypatch.setenv("AIFACTORY_REGISTRATION_URL", "http://127.0.0.1:1/control")
    with pytest.raises(ConfigError, match="set both or neither"):
        Registration.from_env()


# ---- the route, through the real FastAPI app --------------------------------------------------------

def _meta(**fields) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


def test_register_route_stamps_the_key_tenant_and_names_bad_fields(home, weights):
    from fastapi.testclient import TestClient

    from aifactory.control.app import create_app
    from aifactory.security.apikeys import KeyStore

    keys = KeyStore(home)
    a_key = keys.create(tenant="a", actor="ops").secret
    admin = keys.create(tenant=None, role="admin", actor="ops").secret
    client = TestClient(create_app(home))
    # 2 MiB (over the JSON bodies' 1 MiB, within the weights' bound) of bytes that would read as JSON nested 64 deep
    blob = b"[" * 64 + open(weights, "rb").read() * 1024
    meta = dict(name="gpt-tiny", model_config={"d": 1}, manifest={"tenant": "b"})

    def post(key=None, body=blob, **over):
        headers = {"Content-Type": "application/octet-stream", "X-Aifactory-Registration": _meta(**(meta | over))}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return client.post("/v1/models/register", content=body, headers=headers)

    assert post().status_code == 401
    assert post("aifr_0000000000000000_" + "A" * 43).status_code == 401
    resp = post(a_key)
    assert resp.status_code == 201, resp.text
    got = resp.json()
    assert got["tenant"] == "a" and got["manifest"]["tenant"] == "a" and got["size_bytes"] == len(blob)
    assert post(a_key, tenant="b").status_code == 403
    no_tenant = post(admin)
    assert no_tenant.status_code == 422 and no_tenant.json()["error"]["fields"] == ["tenant"]
    assert post(admin, tenant="c").json()["tenant"] == "c"
    bad_name = post(a_key, name="../../audit.sqlite")
    assert bad_name.status_code == 422 and "name" in bad_name.json()["error"]["fields"]
    empty = post(a_key, body=b"")
    assert empty.status_code == 422 and empty.json()["error"]["fields"] == ["body"]
    garbled = client.post("/v1/models/register", content=blob, headers={
        "Content-Type": "application/octet-stream", "Authorization": f"Bearer {a_key}",
        "X-Aifactory-Registration": "%%%"})
    assert garbled.status_code == 422 and garbled.json()["error"]["fields"] == ["X-Aifactory-Registration"]
    as_json = client.post("/v1/models/register", content=blob, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {a_key}"})
    assert as_json.status_code == 413  # the large-body bound is for raw weights only
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {a_key}"}).json()
    assert [(m["tenant"], m["version"]) for m in listed] == [("a", "v1")]
    pem = client.get("/v1/models/signing-key", headers={"Authorization": f"Bearer {a_key}"})
    assert pem.status_code == 200 and "PUBLIC KEY" in pem.text and "PRIVATE" not in pem.text
