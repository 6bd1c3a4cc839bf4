"""CLI behaviour that needs no cluster: bad input fails in one line, without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from aifactory.cli._common import parse_bytes
from aifactory.exceptions import ConfigError


def _factory(*args, env=None):
    return subprocess.run([str(Path(sys.executable).parent / "factory"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_invalid_tenant_is_one_line_and_submits_nothing():
    proc = _factory("submit", "--tenant", "Bad_Name", "--address", "http://127.0.0.1:9", "--", "python", "-c", "1")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "Bad_Name" in proc.stderr and "tenant" in proc.stderr


def test_unreachable_address_is_one_line():
    proc = _factory("jobs", "--address", "http://127.0.0.1:9")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "no Ray cluster answers at http://127.0.0.1:9" in proc.stderr


def test_missing_entrypoint():
    proc = _factory("submit", "--tenant", "a", "--address", "http://127.0.0.1:9")
    assert proc.returncode != 0 and "entrypoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text,expected", [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("500M", 500 * 10**6), ("1024", 1024)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ConfigError):
        parse_bytes("lots")


def test_status_of_a_home_with_no_cluster(tmp_path):
    import os

    proc = _factory("--home", str(tmp_path), "status", "--format", "json", env={**os.environ})
    assert proc.returncode == 3 and '"down"' in proc.stdout


def test_json_output_keeps_stdout_parseable(capsys):
    """Ray forwards worker logs to the driver's sys.stdout; with --format json only the result may land there."""
    import json

    from aifactory.cli._output import emit_obj, results_only_on_stdout

    with results_only_on_stdout(True):
        print("(raylet) WARNING: 26 PYTHON worker processes have been started")
        emit_obj({"run": "r1", "reproduced": True}, "json")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"run": "r1", "reproduced": True}
    assert "raylet" in err
