"""Per-tenant serving usage, queryable without Prometheus: ``tenant_usage(app_name)``.

Replicas push per-tenant deltas (see :class:`aifactory.serve.metrics.UsageRecorder`) to one named,
detached actor, the usage book, which survives replica restarts and Serve redeploys; cost accounting
reads it to split a shared deployment between tenants. Call from a Ray driver.
"""

from __future__ import annotations

from aifactory.cost.records import SERVE_USAGE_BOOK as BOOK_NAME, SERVE_USAGE_NAMESPACE as NAMESPACE


def _book_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class UsageBook:
        def __init__(self):
            self._apps: dict[str, dict[str, dict[str, float]]] = {}

        def record(self, app: str, deltas: dict[str, dict[str, float]]) -> None:
            book = self._apps.setdefault(app, {})
            for tenant, row in deltas.items():
                mine = book.setdefault(tenant, {})
                for k, v in row.items():
                    mine[k] = mine.get(k, 0.0) + v

        def get(self, app: str | None = None) -> dict:
            return self._apps.get(app, {}) if app else self._apps

        def reset(self, app: str) -> None:
            self._apps.pop(app, None)

    return UsageBook


def get_book():
    """The usage book actor, created on first use."""
    return _book_class().options(
        name=BOOK_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def tenant_usage(app_name: str, *, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
    """``{tenant: {"requests": n, "processing_s": s, "tokens": n, ...}}`` for one Serve application.

    Counts lag the replicas by at most ~0.5 s (their flush interval). Extra keys: ``errors``,
    ``prompt_tokens``, ``completion_tokens``, ``cache_<name>_lookups`` / ``cache_<name>_hits``.
    """
    import ray

    raw = ray.get(get_book().get.remote(app_name), timeout=timeout_s)
    out = {}
    for tenant, row in raw.items():
        clean = {k: (int(v) if k != "processing_s" else float(v)) for k, v in row.items()}
        clean.setdefault("requests", 0)
        clean.setdefault("processing_s", 0.0)
        clean.setdefault("tokens", 0)
        out[tenant] = clean
    return out
