"""The control API's input bounds and the serving writer's rules, without Ray: names answer 400 naming the
field, bodies are bounded in size, depth and Unicode, each key has a rate (429 + Retry-After), a second change
of one Serve application is refused while the first runs, and header auth is refused beyond loopback (the
shipped KubeRay manifests included)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from aifactory.control.app import create_app
from aifactory.control.guard import KeyRateLimiter, check_body, json_depth
from aifactory.exceptions import ConfigError
from aifactory.home import FactoryHome
from aifactory.security.apikeys import KeyStore
from aifactory.serve.deploy import COMPLETIONS_IMPORT, ChangeConflict, ServeREST, check_exposure

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path):
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    store = KeyStore(home)
    key = store.create(tenant="alpha", actor="ops").secret
    client = TestClient(create_app(home, address="http://127.0.0.1:9", rate=(1000.0, 1000)),
                        raise_server_exceptions=False)
    return client, {"Authorization": f"Bearer {key}"}, home


@pytest.mark.parametrize("model_name", ["../cluster/cluster.json", "../audit.sqlite", "gpt\x00", "a/b", "a..b",
                                        "x" * 200])
def test_bad_model_names_answer_400_naming_the_field(api, model_name):
    client, h, _ = api
    resp = client.post("/v1/serve/apps", headers=h, json={"name": "chat", "model_name": model_name})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["fields"][0] in ("model_name", "body.model_name"), resp.text


@pytest.mark.parametrize("path", ["/v1/serve/apps/a..b/promote", "/v1/serve/apps/..%2Faudit.sqlite/rollback",
                                  "/v1/serve/apps/Alpha.chat/rollback", "/v1/serve/apps/a%00b/rollback",
                                  "/v1/jobs/..%2E/logs", "/v1/jobs/a%00b", "/v1/serve/apps/a%ED%A0%80/cache"])
def test_bad_names_in_paths_answer_400_or_404_never_5xx(api, path):
    client, h, _ = api
    method = "GET" if path.endswith(("/cache", "/logs")) or path.startswith("/v1/jobs/a") else "POST"
    resp = client.request(method, path, headers=h)
    assert resp.status_code in (400, 404), (path, resp.status_code, resp.text)
    if resp.status_code == 400:
        assert resp.json()["error"]["fields"][0] in ("app", "job_id", "path"), resp.text


def test_bad_model_version_answers_400(api):
    client, h, _ = api
    resp = client.post("/v1/serve/apps", headers=h, json={"name": "chat", "model_name": "gpt",
                                                           "model_version": "../v1"})
    assert resp.status_code == 400 and resp.json()["error"]["fields"] == ["model_version"], resp.text


def test_bodies_are_bounded_in_size_depth_and_unicode(api):
    client, h, _ = api
    deep = '{"entrypoint": ' + "[" * 2000 + "]" * 2000 + "}"
    resp = client.post("/v1/jobs", headers={**h, "Content-Type": "application/json"}, content=deep)
    assert resp.status_code == 400 and resp.json()["error"]["fields"] == ["body"], resp.text
    for bad in ('{"entrypoint": "echo \\ud800"}', '{"entrypoint": "echo \\u0000 hi"}'):
        resp = client.post("/v1/jobs", headers={**h, "Content-Type": "application/json"}, content=bad)
        assert resp.status_code == 400 and resp.json()["error"]["fields"] == ["body.entrypoint"], resp.text
    huge = json.dumps({"entrypoint": "x" * (2 << 20)})
    resp = client.post("/v1/jobs", headers={**h, "Content-Type": "application/json"}, content=huge)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large", resp.text
    resp = client.post("/v1/jobs", headers={**h, "Content-Type": "application/json"},
                       content=(b"x" * 4096 for _ in range(600)))  # streamed, no Content-Length: still bounded
    assert resp.status_code == 413, resp.text
    assert client.get("/v1/audit", headers=h, params={"action": "job\x00"}).status_code == 400


def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b'{"a": [1, {"b": "[[[["}]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    check_body(b'{"a": [[[1]]]}', max_depth=4)
    with pytest.raises(Exception, match="deeper than 3"):
        check_body(b'{"a": [[[1]]]}', max_depth=3)


def test_each_key_has_a_rate_and_429_says_when_to_retry(tmp_path):
    home = FactoryHome.from_env(tmp_path / "home").ensure()
    store = KeyStore(home)
    a, b = (store.create(tenant=t, actor="ops").secret for t in ("alpha", "beta"))
    client = TestClient(create_app(home, address="http://127.0.0.1:9", rate=(0.5, 3)), raise_server_exceptions=False)
    codes = [client.get("/v1/whoami", headers={"Authorization": f"Bearer {a}"}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    resp = client.get("/v1/whoami", headers={"Authorization": f"Bearer {a}"})
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == "rate_limited"
    assert client.get("/v1/whoami", headers={"Authorization": f"Bearer {b}"}).status_code == 200  # its own bucket


def test_rate_limiter_refills():
    t = [0.0]
    rl = KeyRateLimiter(2.0, 2, clock=lambda: t[0])
    assert [rl.take("k") for _ in range(3)] == [0.0, 0.0, 0.5]
    t[0] += 0.5
    assert rl.take("k") == 0.0


def test_a_second_change_of_one_app_is_refused_while_the_first_runs(tmp_path):
    rest = ServeREST("http://127.0.0.1:9", {}, lock_dir=tmp_path)
    other = ServeREST("http://127.0.0.1:9", {}, lock_dir=tmp_path)  # another writer (e.g. another replica)
    with rest.changing("alpha.chat", "canary"):
        with pytest.raises(ChangeConflict, match="alpha.chat.*promote refused.*a canary"):
            with other.changing("alpha.chat", "promote"):
                pass
        with other.changing("beta.chat", "deploy"):  # another application is not held up
            pass
    with other.changing("alpha.chat", "promote"):  # free again once the first change ended
        pass


def test_the_writer_lock_serializes_read_modify_writes(tmp_path):
    rest = ServeREST("http://127.0.0.1:9", {}, lock_dir=tmp_path)
    inside, overlaps = [0], []

    def work():
        for _ in range(20):
            with ServeREST("http://127.0.0.1:9", {}, lock_dir=tmp_path).writer():
                inside[0] += 1
                overlaps.append(inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(overlaps) == 80 and max(overlaps) == 1
    assert rest.lock_dir.is_dir()


def test_header_auth_is_refused_beyond_loopback():
    entry = {"name": "completions", "import_path": COMPLETIONS_IMPORT, "args": {"model_name": "gpt"}}
    check_exposure("127.0.0.1", entry)  # loopback: header mode is allowed
    with pytest.raises(ConfigError, match="auth: 'header'.*0.0.0.0"):
        check_exposure("0.0.0.0", entry)
    check_exposure("0.0.0.0", {**entry, "args": {"model_name": "gpt", "auth": "factory-keys"}})


def test_shipped_ray_services_use_factory_keys():
    manifests = sorted((REPO / "cluster" / "kuberay").glob("ray-service.*.yaml"))
    assert len(manifests) >= 2
    for path in manifests:
        serve_cfg = yaml.safe_load(yaml.safe_load(path.read_text())["spec"]["serveConfigV2"])
        host = serve_cfg["http_options"]["host"]
        for app in serve_cfg["applications"]:
            assert app["import_path"].startswith("serve_apps."), app["import_path"]
            check_exposure(host, app)  # raises for an app in header mode on 0.0.0.0
