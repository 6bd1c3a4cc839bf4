"""Cache management of the completions app (pure logic): per-tenant drop and the user_config flush protocol,
and an app restricted to its owner tenant."""

from __future__ import annotations

import pytest

from aifactory.serve.cache import ExactCache, SemanticCache, flush_requests
from aifactory.serve.schemas import APIError
from aifactory.serve.tenants import TenantResolver


def test_exact_cache_drops_only_the_named_tenant():
    c = ExactCache(ttl_s=60, max_entries=10)
    for tenant in ("alpha", "alpha", "beta"):
        c.put(ExactCache.key(tenant, "v1", prompt=f"{tenant}-{len(c)}"), "answer")
    assert (c.entries("alpha"), c.entries("beta"), c.entries()) == (2, 1, 3)
    assert c.drop("alpha") == 2
    assert (c.entries("alpha"), c.entries("beta")) == (0, 1)
    assert c.get(ExactCache.key("beta", "v1", prompt="beta-2")) == "answer"
    assert c.drop(None) == 1 and len(c) == 0


def test_semantic_cache_drops_only_the_named_tenant():
    c = SemanticCache(threshold=0.9, ttl_s=60, max_entries=10)
    a, b = SemanticCache.scope("alpha", "v1", temperature=0), SemanticCache.scope("beta", "v1", temperature=0)
    c.put(a, [1.0, 0.0], "A")
    c.put(b, [1.0, 0.0], "B")
    assert c.drop("alpha") == 1
    assert c.get(a, [1.0, 0.0]) is None
    assert c.get(b, [1.0, 0.0])[0] == "B"


def test_flush_requests_fire_once_per_new_token():
    assert flush_requests({}, {}) == []
    assert flush_requests({}, {"alpha": "t1"}) == ["alpha"]
    assert flush_requests({"alpha": "t1"}, {"alpha": "t1"}) == []  # a re-applied config flushes nothing again
    assert flush_requests({"alpha": "t1"}, {"alpha": "t2", "*": "t3"}) == [None, "alpha"]
    assert flush_requests({"alpha": "t1", "beta": "t9"}, {"alpha": "t1", "beta": "t9"}) == []


def test_owner_only_app_refuses_other_tenants():
    r = TenantResolver(auth="header", api_keys={}, home=None, tenants=["alpha"])
    assert r({"x-tenant": "alpha"}) == "alpha"
    with pytest.raises(APIError) as err:
        r({"x-tenant": "beta"})
    assert err.value.status == 403
    with pytest.raises(APIError):
        r({})  # unattributed callers are not the owner either
    assert TenantResolver(auth="header", api_keys={}, home=None)({"x-tenant": "beta"}) == "beta"
