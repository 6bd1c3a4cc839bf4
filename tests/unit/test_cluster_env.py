"""Ray reads its loopback switch and auth mode once, at import; the factory must still keep nodes on 127.0.0.1."""

import os
import subprocess
import sys

from aifactory.home import FactoryHome


def test_apply_ray_env_keeps_a_driver_that_imported_ray_first_on_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    import ray._private.ray_constants as constants

    from aifactory.cluster.connect import apply_ray_env

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", True)  # as imported without the variable
    apply_ray_env(FactoryHome.from_env(tmp_path))
    assert constants.ENABLE_RAY_CLUSTER is False
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_the_cli_sets_the_loopback_switch_before_ray_is_imported(tmp_path):
    code = (
        "import os, sys; os.environ.pop('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', None);"
        "from aifactory.cli.main import main;"
        "rc = main(['--home', sys.argv[1], 'status', '--format', 'json']);"
        "import ray._private.ray_constants as c; print(rc, c.ENABLE_RAY_CLUSTER)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120).stdout.strip().splitlines()[-1]
    assert out == "3 False"
