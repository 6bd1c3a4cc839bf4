"""The factory control API: the one door tenants use, holding the cluster credential on their behalf.

- :mod:`aifactory.control.app`: the FastAPI app (``create_app(home)``), served by Ray Serve from
  ``serve_apps/control.py``. Tenants authenticate with ``Authorization: Bearer <API key>``; tenant tagging,
  quotas and budgets are enforced here, server-side; a tenant sees only its own work (others' answer 404).
- :mod:`aifactory.control.client`: ``ControlClient``, the HTTP client the CLI and SDK use when
  ``AIFACTORY_API_URL`` and ``AIFACTORY_API_KEY`` are set (same job methods as ``aifactory.jobs.Client``).
"""
