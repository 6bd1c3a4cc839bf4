"""Serving with auth='factory-keys': the hashed factory key store decides the tenant, never the caller's header."""

import pytest

from aifactory.home import FactoryHome
from aifactory.security.apikeys import KeyStore
from aifactory.serve.config import EmbeddingsArgs
from aifactory.serve.schemas import APIError
from aifactory.serve.tenants import TenantResolver


@pytest.fixture()
def keyed(tmp_path):
    home = FactoryHome.from_env(tmp_path).ensure()
    store = KeyStore(home)
    search = store.create(tenant="search", name="app").secret
    admin = store.create(tenant=None, role="admin", name="ops").secret
    return TenantResolver(auth="factory-keys", api_keys={}, home=str(home.root)), store, search, admin


def _status(resolver, headers):
    with pytest.raises(APIError) as info:
        resolver(headers)
    return info.value.status, info.value.param


def test_key_decides_the_tenant(keyed):
    resolver, _, search, _ = keyed
    assert resolver({"authorization": f"Bearer {search}"}) == "search"
    assert resolver({"authorization": f"Bearer {search}", "x-tenant": "search"}) == "search"


def test_unauthenticated_and_forged_requests_are_refused(keyed):
    resolver, _, search, _ = keyed
    assert _status(resolver, {}) == (401, "Authorization")
    assert _status(resolver, {"x-tenant": "search"}) == (401, "Authorization")  # a header alone is not identity
    assert _status(resolver, {"authorization": "Bearer aifk_nope_nope"}) == (401, "Authorization")
    assert _status(resolver, {"authorization": f"Bearer {search}", "x-tenant": "ads"}) == (403, "X-Tenant")


def test_revoked_key_is_refused(keyed):
    resolver, store, search, _ = keyed
    key_id = store.authenticate(search).key_id
    store.revoke(key_id)
    assert _status(resolver, {"authorization": f"Bearer {search}"}) == (401, "Authorization")


def test_admin_acts_for_a_named_tenant_only(keyed):
    resolver, _, _, admin = keyed
    assert resolver({"authorization": f"Bearer {admin}", "x-tenant": "ads"}) == "ads"
    assert _status(resolver, {"authorization": f"Bearer {admin}"}) == (400, "X-Tenant")


def test_header_mode_is_unchanged():
    resolver = TenantResolver(auth="header", api_keys={"k1": "ads"}, home=None)
    assert resolver({"x-tenant": "search"}) == "search"
    assert resolver({"authorization": "Bearer k1"}) == "ads"
    assert resolver({}) == "unattributed"


def test_auth_mode_is_validated():
    with pytest.raises(ValueError):
        EmbeddingsArgs(auth="none")
