"""Telemetry: NVML and process readings behind one API, one Unknown with its reason, NVML initialised once.

On this project's CPU machines NVML raises NVMLError_LibraryNotFound (a real pynvml, no mock); on a GPU
machine the same tests check real readings.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pynvml
import pytest

from aifactory import telemetry
from aifactory.telemetry import Unknown

PLATFORM = Path(__file__).resolve().parents[2] / "platform" / "aifactory"


def test_unknown_is_falsy_and_says_why():
    u = Unknown("no permission")
    assert not u and str(u) == "unknown (no permission)" and u == Unknown("no permission")
    assert telemetry.known(u) is None and telemetry.known(0) == 0


@pytest.mark.parametrize("code, reason", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver: the NVML shared library was not found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA driver is not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, telemetry.NO_PERMISSION),
    (pynvml.NVML_ERROR_NOT_SUPPORTED, telemetry.NOT_SUPPORTED),
])
def test_each_nvml_failure_has_its_reason(code, reason):
    assert telemetry.nvml_reason(pynvml.NVMLError(code)) == reason  # pynvml maps the code to its subclass


def test_no_library_and_unmapped_errors_still_say_why():
    assert telemetry.nvml_reason(ImportError("No module named 'pynvml'")) == telemetry.NO_LIBRARY
    assert telemetry.nvml_reason(pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)).startswith("NVMLError_Timeout")


def test_gpu_readings_are_values_or_one_unknown_with_its_reason():
    devices = telemetry.gpus()
    status = telemetry.gpu_status()
    if isinstance(devices, Unknown):
        assert status == str(devices) and devices.reason
        assert telemetry.gpu_energy_j() == devices or isinstance(telemetry.gpu_energy_j(), Unknown)
        count = telemetry.gpu_count()
        assert count == 0 or isinstance(count, Unknown)
        return
    assert status == f"ok ({len(devices)} devices)" and telemetry.gpu_count() == len(devices)
    for d in devices:
        assert d.uuid.startswith("GPU-") and d.name
        for v in (d.util_pct, d.memory_used_bytes, d.memory_total_bytes, d.power_w, d.energy_j):
            assert isinstance(v, (int, float, Unknown))
        assert isinstance(d.memory_total_bytes, Unknown) or d.memory_total_bytes > 0


def test_nvml_is_initialised_once_per_process_by_every_reader():
    """Every NVML reader of the library (meter, context, energy, factory up/status) in one fresh process:
    nvmlInit is called once in all (counted on the real pynvml, which still runs)."""
    code = """
import pynvml
calls = []
real = pynvml.nvmlInit
pynvml.nvmlInit = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
from aifactory import telemetry
from aifactory.bench.context import EnergyMeter, gpu_info
from aifactory.cli.cluster import gpu_lines
from aifactory.cluster.local import _detect_gpus
from aifactory.cost.gpu import read_nvml
from aifactory.cost.sampler import gpu_status
for _ in range(2):
    gpu_info(); m = EnergyMeter(); m.start(); m.stop_joules(); read_nvml("n"); gpu_status(); _detect_gpus()
    gpu_lines(); telemetry.gpus(); telemetry.gpu_energy_j()
print(len(calls), telemetry.nvml_init_calls())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_one_nvml_reader_and_one_process_reader_in_the_library():
    """The grep of the issue: NVML and process CPU/RSS are read only in telemetry.py."""
    readers = re.compile(r"pynvml|nvmlInit|\.cpu_times\(|\.memory_info\(|virtual_memory\(")
    found = [f"{f.relative_to(PLATFORM)}:{n}" for f in sorted(PLATFORM.rglob("*.py")) if f.name != "telemetry.py"
             for n, line in enumerate(f.read_text().splitlines(), 1) if readers.search(line)]
    assert found == []


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_count_the_process_and_its_children():
    me = os.getpid()
    before = telemetry.cpu_seconds([me])
    _burn(0.3)
    assert telemetry.cpu_seconds([me]) - before >= 0.25
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()+0.5\n"
                              "while time.process_time()<t: pass\ntime.sleep(30)"])
    try:
        deadline = time.time() + 20
        while telemetry.cpu_seconds([child.pid]) < 0.45 and time.time() < deadline:
            time.sleep(0.1)
        with_children = telemetry.cpu_seconds([me])
        alone = telemetry.cpu_seconds([me], children=False)
        assert with_children - alone >= 0.45
    finally:
        child.kill()
        child.wait()
    gone = telemetry.cpu_seconds([child.pid])
    assert gone == Unknown(telemetry.NO_SUCH_PROCESS)


def test_rss_follows_memory_and_a_gone_process_is_unknown():
    before = telemetry.rss_bytes()
    block = bytearray(64 << 20)  # zero-filled, so its pages are touched
    try:
        assert telemetry.rss_bytes() - before >= 48 << 20
        assert telemetry.rss_bytes(os.getpid()) > 0
    finally:
        del block
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert telemetry.rss_bytes(child.pid) == Unknown(telemetry.NO_SUCH_PROCESS)
    assert telemetry.host_memory_bytes() > 1 << 30
