"""Every private or undocumented Ray API the project uses, each behind one function.

Why one module: these are the places a Ray upgrade breaks us without a deprecation warning. Each function
says why we need it, the Ray version it was checked on, and what happens when it is gone; nothing else
in ``platform/`` may touch ``ray._private``, ``ray._raylet``, Serve's private context or the dashboard's
undocumented routes (``tests/unit/test_ray_compat.py`` greps for it, and checks that each API still has
the shape we rely on, so it fails loudly when Ray changes).

Base layer: imports nothing of ours; Ray is imported inside each function.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Mapping

CHECKED_ON = "2.60.0"  # the Ray version every function below was checked against


class RayCompatError(RuntimeError):
    """A private Ray API we rely on is missing or changed shape (``api`` names it)."""

    def __init__(self, api: str, why: str):
        super().__init__(f"Ray {_ray_version()}: {api} is unavailable ({why}); it was checked on Ray {CHECKED_ON}")
        self.api, self.why = api, why

    def __reduce__(self):
        return (RayCompatError, (self.api, self.why))


def _ray_version() -> str:
    ray = sys.modules.get("ray")
    return getattr(ray, "__version__", "?") if ray is not None else "(not imported)"


def keep_imported_ray_on_loopback() -> bool:
    """Set ``ray._private.ray_constants.ENABLE_RAY_CLUSTER = False`` if Ray is already imported.

    Why: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray_constants`` is imported; a driver
    that imported Ray before the factory set the variable would start its embedded node on the machine's
    network address instead of 127.0.0.1 (../shared/RAY-2.60-NOTES.md, "Keep Ray on loopback").
    Checked on Ray 2.60.0. When it is gone: the module or the constant is missing and this raises
    :class:`RayCompatError` (rather than silently leaving a node off loopback). Returns whether Ray was
    imported (False: nothing to fix; the environment variable does the job at import).
    """
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        return False
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        raise RayCompatError("ray._private.ray_constants.ENABLE_RAY_CLUSTER", "the constant is gone")
    constants.ENABLE_RAY_CLUSTER = False
    return True


def refresh_auth_cache() -> bool:
    """Make an already imported Ray re-read ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN_PATH``.

    Why: Ray caches its auth mode and token when ``ray._raylet`` is first imported, so a driver that imported
    Ray before the factory pointed it at the cluster's token is refused by its own cluster
    (InvalidAuthToken). This does what Ray's own ``_enable_token_auth`` and test utilities do:
    ``ray._raylet.Config.initialize("")`` and ``AuthenticationTokenLoader.instance().reset_cache()``.
    Checked on Ray 2.60.0. When it is gone: raises :class:`RayCompatError` naming the missing piece.
    Returns whether Ray was imported (False: nothing cached yet).
    """
    raylet = sys.modules.get("ray._raylet")
    if raylet is None:
        return False
    try:
        config, loader = raylet.Config, raylet.AuthenticationTokenLoader
        config.initialize("")
        loader.instance().reset_cache()
    except AttributeError as err:
        raise RayCompatError("ray._raylet.Config.initialize / AuthenticationTokenLoader.reset_cache", str(err)) from err
    return True


def actor_times() -> dict[str, tuple[float | None, float | None]]:
    """actor id (hex) -> (start, end) in Unix seconds (None: not yet / not known), from the GCS actor table.

    Why: the public state API's ``list_actors`` has no start or end times, and the meter needs them to bill
    an actor that lived and died between two samples exactly. The GCS actor table has them, read through
    Ray's debugging accessor ``ray._private.state.actors()`` (rows with ``StartTime``/``EndTime`` in ms).
    Checked on Ray 2.60.0. Needs a connected driver (``ray.init``). When it is gone or fails: raises
    :class:`RayCompatError`; the meter then estimates actors' edges at sample midpoints and marks those
    usage records ``estimated`` (reports show it).
    """
    try:
        import ray
        from ray._private import state as gcs_state
    except ImportError as err:
        raise RayCompatError("ray._private.state", str(err)) from err
    if not ray.is_initialized():
        raise RayCompatError("ray._private.state.actors", "this process is not a connected Ray driver")
    try:
        table = gcs_state.actors()
    except Exception as err:  # noqa: BLE001 - a private accessor: any failure is "unavailable", said loudly
        raise RayCompatError("ray._private.state.actors", f"{type(err).__name__}: {err}") from err
    return actor_times_of(table)


def actor_times_of(table: Mapping[str, Mapping]) -> dict[str, tuple[float | None, float | None]]:
    """The (start, end) of each row of the GCS actor table as ``ray._private.state.actors()`` returns it."""
    return {aid: (row.get("StartTime") / 1000.0 if row.get("StartTime") else None,
                  row.get("EndTime") / 1000.0 if row.get("EndTime") else None)
            for aid, row in table.items()}


def dashboard_url() -> str:
    """The connected cluster's dashboard (state API) URL, ``http://host:port``.

    Why: a driver attached with ``ray.init(address=...)`` knows its cluster, but the public state API with
    no address looks for *a* local cluster and fails where a host runs several ("Found multiple active Ray
    instances"). ``ray._private.worker.get_dashboard_url()`` returns the connected one's. Checked on Ray
    2.60.0. Needs a connected driver; raises :class:`RayCompatError` otherwise or when it is gone.
    """
    try:
        import ray
        from ray._private.worker import get_dashboard_url
    except ImportError as err:
        raise RayCompatError("ray._private.worker.get_dashboard_url", str(err)) from err
    if not ray.is_initialized():
        raise RayCompatError("ray._private.worker.get_dashboard_url", "this process is not a connected Ray driver")
    try:
        url = get_dashboard_url()
    except Exception as err:  # noqa: BLE001 - a private accessor: any failure is "unavailable", said loudly
        raise RayCompatError("ray._private.worker.get_dashboard_url", f"{type(err).__name__}: {err}") from err
    if not url:
        raise RayCompatError("ray._private.worker.get_dashboard_url", "the cluster runs no dashboard")
    return url if "://" in url else f"http://{url}"


def serve_controller_client(*, start_if_missing: bool = False):
    """Serve's controller client on the connected cluster, or None where Serve is not running.

    Why: Serve has no public way to learn the HTTP port of the proxy it already runs (``serve.start``
    cannot change ``http_options`` once Serve runs, ../shared/RAY-2.60-NOTES.md, Serve), and benchmarks
    must send their load to that port. ``ray.serve.context._get_global_client(raise_if_no_controller_running=
    False)`` returns the client (``.http_config.port``) or None. Checked on Ray 2.60.0. When it is gone:
    raises :class:`RayCompatError`.
    """
    try:
        from ray.serve.context import _get_global_client
    except ImportError as err:
        raise RayCompatError("ray.serve.context._get_global_client", str(err)) from err
    try:
        return _get_global_client(raise_if_no_controller_running=False)
    except TypeError as err:  # the keyword is gone
        raise RayCompatError("ray.serve.context._get_global_client(raise_if_no_controller_running=)",
                             str(err)) from err


def serve_http_port() -> int | None:
    """The HTTP port of the Serve proxy already running on the connected cluster (None: Serve is not up)."""
    client = serve_controller_client()
    return None if client is None else int(client.http_config.port)


def serve_delete_nowait(name: str) -> None:
    """Delete a Serve application without waiting for its replicas to drain.

    Why: behind the HAProxy ingress ``serve.delete`` waits a fixed 30 s drain (../shared/RAY-2.60-NOTES.md,
    Serve); a sweep moving to its next configuration only needs the old replicas' CPUs back eventually, so
    it deletes with the private keyword ``_blocking=False``. Checked on Ray 2.60.0. When it is gone: raises
    :class:`RayCompatError` (the caller may delete blocking instead).
    """
    from ray import serve

    try:
        serve.delete(name, _blocking=False)
    except TypeError as err:
        raise RayCompatError("ray.serve.delete(_blocking=False)", str(err)) from err


CLUSTER_STATUS_ROUTE = "/api/cluster_status"


def cluster_usage(dashboard_url: str, headers: Mapping[str, str], *, timeout_s: float = 5.0) -> dict[str, tuple]:
    """Resource -> (used, total) from the dashboard's cluster status (the autoscaler's load metrics).

    Why: ``factory status`` shows total and used resources from the command line without connecting a Ray
    driver (a driver costs seconds and a job id); the dashboard's undocumented ``GET /api/cluster_status``
    answers ``data.clusterStatus.loadMetricsReport.usage`` = {resource: [used, total]}. Checked on Ray
    2.60.0. An empty dict: the first report has not arrived yet (a few seconds after start). When the route
    or the shape is gone: raises :class:`RayCompatError`.
    """
    import urllib.error

    req = urllib.request.Request(f"{dashboard_url.rstrip('/')}{CLUSTER_STATUS_ROUTE}", headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise RayCompatError(f"the dashboard's GET {CLUSTER_STATUS_ROUTE}", "404 Not Found") from err
        raise
    return cluster_usage_of(body)


def cluster_usage_of(body: Mapping) -> dict[str, tuple]:
    """The usage map of one ``/api/cluster_status`` answer (see :func:`cluster_usage`)."""
    data = body.get("data")
    if not isinstance(data, Mapping):
        raise RayCompatError(f"the dashboard's GET {CLUSTER_STATUS_ROUTE}", "no 'data' in its answer")
    report = (data.get("clusterStatus") or {}).get("loadMetricsReport") or {}
    return {k: tuple(v) for k, v in (report.get("usage") or {}).items()}
