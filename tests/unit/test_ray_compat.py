"""Each private or undocumented Ray API in aifactory.ray_compat still exists with the shape we rely on.

No test here starts Ray: each reads the installed Ray's modules, signatures and protos (the live checks of
the GCS actor table and the dashboard route are in tests/integration/test_ray_compat_live.py). When a Ray
upgrade changes one of them, the test of that function fails, naming it.
"""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aifactory import ray_compat

PLATFORM = Path(__file__).resolve().parents[2] / "platform" / "aifactory"
# What only ray_compat may touch.
PRIVATE = re.compile(r"ray\._private|ray\._raylet|_get_global_client|_blocking\s*=|/api/cluster_status")


def test_the_installed_ray_is_the_one_these_apis_were_checked_on():
    import ray

    assert ray.__version__ == ray_compat.CHECKED_ON, "re-check every function of aifactory.ray_compat, then bump CHECKED_ON"


def test_no_private_ray_api_outside_ray_compat():
    found = []
    for f in sorted(PLATFORM.rglob("*.py")):
        if f.name == "ray_compat.py":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{f.relative_to(PLATFORM)}:{n}: {line.strip()}")
    assert found == []


def test_loopback_constant_exists_and_is_overwritten(monkeypatch):
    import ray._private.ray_constants as constants

    assert isinstance(constants.ENABLE_RAY_CLUSTER, bool)
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)
    assert ray_compat.keep_imported_ray_on_loopback() is True
    assert constants.ENABLE_RAY_CLUSTER is False


def test_loopback_constant_gone_is_a_loud_error(monkeypatch):
    import ray._private.ray_constants as constants

    monkeypatch.delattr(constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(ray_compat.RayCompatError, match="ENABLE_RAY_CLUSTER"):
        ray_compat.keep_imported_ray_on_loopback()


def test_auth_cache_reset_exists():
    import ray._raylet as raylet

    assert callable(raylet.Config.initialize)
    assert callable(raylet.AuthenticationTokenLoader.instance().reset_cache)
    assert ray_compat.refresh_auth_cache() is True


def test_gcs_actor_accessor_has_the_shape_the_meter_reads():
    from ray._private import state
    from ray.core.generated import gcs_pb2

    params = inspect.signature(state.actors).parameters
    assert all(p.default is None for p in params.values())  # callable with no arguments: every actor
    fields = gcs_pb2.ActorTableData.DESCRIPTOR.fields_by_name
    assert "start_time" in fields and "end_time" in fields
    # A real proto row through Ray's own row builder, as actors() returns it, then our reading of it.
    row = state.GlobalState()._gen_actor_info(
        gcs_pb2.ActorTableData(actor_id=b"\x01" * 16, start_time=1_700_000_000_500, end_time=0))
    assert ray_compat.actor_times_of({row["ActorID"]: row}) == {row["ActorID"]: (1_700_000_000.5, None)}


def test_actor_times_without_a_driver_is_an_error_not_an_empty_table():
    # A fresh interpreter, which is no Ray driver (this pytest process may be one: the integration tests share it).
    code = ("import ray\nfrom aifactory import ray_compat\nassert not ray.is_initialized()\n"
            "try:\n    ray_compat.actor_times()\nexcept ray_compat.RayCompatError as e:\n    print('error:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not a connected Ray driver" in proc.stdout


def test_serve_global_client_takes_the_keyword_and_has_http_config():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client

    param = inspect.signature(_get_global_client).parameters["raise_if_no_controller_running"]
    assert param.default is True
    assert isinstance(inspect.getattr_static(ServeControllerClient, "http_config"), property)


def test_serve_delete_takes_blocking():
    from ray import serve

    param = inspect.signature(serve.delete).parameters["_blocking"]
    assert param.default is True


def test_cluster_status_route_and_answer_shape():
    from ray.autoscaler._private.util import LoadMetricsSummary
    from ray.dashboard.modules.reporter.reporter_head import ReportHead
    from ray.dashboard.utils import to_google_style

    handler = ReportHead.get_cluster_status
    assert (handler.__route_method__, handler.__route_path__) == ("GET", ray_compat.CLUSTER_STATUS_ROUTE)
    assert "usage" in {f.name for f in LoadMetricsSummary.__dataclass_fields__.values()}
    # The monitor stores asdict(LoadMetricsSummary) under "load_metrics_report"; the route answers it through
    # rest_response's to_google_style under data.clusterStatus.
    data = to_google_style({"cluster_status": {"load_metrics_report": {"usage": {"CPU": [1.0, 6.0]}}}})
    assert ray_compat.cluster_usage_of({"data": data}) == {"CPU": (1.0, 6.0)}
    assert ray_compat.cluster_usage_of({"data": to_google_style({"cluster_status": None})}) == {}


def test_a_changed_answer_is_a_loud_error():
    with pytest.raises(ray_compat.RayCompatError, match="cluster_status"):
        ray_compat.cluster_usage_of({"msg": "no data"})


def test_errors_pickle_across_ray():
    import pickle

    err = pickle.loads(pickle.dumps(ray_compat.RayCompatError("ray.x", "gone")))
    assert (err.api, err.why) == ("ray.x", "gone") and "checked on Ray 2.60.0" in str(err)
    assert "ray" in sys.modules


def test_dashboard_url_reads_the_connected_nodes_webui():
    from ray._private import worker

    assert list(inspect.signature(worker.get_dashboard_url).parameters) == []
    assert "webui_url" in inspect.getsource(worker.get_dashboard_url)
