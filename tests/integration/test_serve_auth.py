"""Serving with auth='factory-keys' over real HTTP: the hashed factory key store, not a header, names the tenant."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.slow
APP = "embeddings-keys"


@pytest.fixture(scope="module")
def keyed_embeddings(ray_driver, serve_http_port):
    from ray import serve

    from aifactory.home import FactoryHome
    from aifactory.security.apikeys import KeyStore
    from aifactory.serve.apps.embeddings import app_builder
    from aifactory.serve.config import AutoscalingSpec, EmbeddingsArgs

    store = KeyStore(FactoryHome.from_env(ray_driver.home))
    search = store.create(tenant="search", name="serve-auth-test")
    port = serve_http_port
    args = EmbeddingsArgs(num_cpus=0.25, autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=1),
                          auth="factory-keys", home=ray_driver.home)
    serve.run(app_builder(args), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{port}/{APP}/v1/embeddings", store, search
    serve.delete(APP)


def _post(url, headers):
    return httpx.post(url, json={"model": "all-MiniLM-L6-v2", "input": ["hello"]}, headers=headers, timeout=60)


def test_requests_need_a_factory_key_and_the_key_decides_the_tenant(keyed_embeddings):
    from aifactory.serve.usage import tenant_usage

    url, store, search = keyed_embeddings
    for headers in ({}, {"X-Tenant": "search"}, {"Authorization": "Bearer aifk_forged_secret"}):
        r = _post(url, headers)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization", (headers, r.text)
    other = _post(url, {"Authorization": f"Bearer {search.secret}", "X-Tenant": "ads"})
    assert other.status_code == 403 and other.json()["error"]["param"] == "X-Tenant"
    ok = _post(url, {"Authorization": f"Bearer {search.secret}"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384

    deadline = time.monotonic() + 15  # the replicas flush their counters every ~0.5 s
    while time.monotonic() < deadline and tenant_usage(APP).get("search", {}).get("requests", 0) < 1:
        time.sleep(0.5)
    usage = tenant_usage(APP)
    assert usage["search"]["requests"] >= 1 and "ads" not in usage

    store.revoke(search.info.key_id)
    assert _post(url, {"Authorization": f"Bearer {search.secret}"}).status_code == 401
