"""Unit tests never start Ray: ``ray.init`` raises here (as in Ray Serve's own unit tests)."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def _refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration/")

    monkeypatch.setattr(ray, "init", _refuse)
