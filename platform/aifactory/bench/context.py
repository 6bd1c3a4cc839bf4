"""What every trial and every benchmark records about where and how it ran: code, data, model, runtime
flags, hardware, region, and how busy the host was (the one context recorder: sweeps and ``benchmarks/``).

Anything that cannot be determined is recorded as ``"unavailable"`` or ``"none"`` with the reason, never
guessed: a benchmark without its context cannot be compared with a later one.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import time
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

UNAVAILABLE = "unavailable"

# Environment variables that change how Ray, Serve or torch behave, recorded as runtime flags.
_FLAG_VARS = (
    "RAY_SERVE_ENABLE_HA_PROXY", "RAY_TRAIN_V2_ENABLED", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "CUDA_VISIBLE_DEVICES", "RAY_AUTH_MODE",
)


class Hardware(BaseModel):
    model_config = ConfigDict(frozen=True)

    cpu_model: str = Field(description="CPU model name from /proc/cpuinfo (or platform.processor()).")
    cpu_cores: int = Field(description="Logical cores the OS reports.")
    memory_gib: float | None = Field(description="Total memory of the node.")
    gpu_name: str = Field(description="GPU name through NVML, 'none' when NVML finds no GPU/driver.")
    gpu_count: int = Field(description="GPUs NVML sees (0 without a driver).")
    gpu_note: str = Field(default="", description="Why no GPU name was found, when none was.")
    hostname: str = Field(description="Node host name.")

    @property
    def sku(self) -> str:
        gpu = f" + {self.gpu_count}x {self.gpu_name}" if self.gpu_count else ""
        return f"{self.cpu_model} ({self.cpu_cores} cores){gpu}"


class BenchContext(BaseModel):
    """The provenance of a benchmark run (or trial)."""

    model_config = ConfigDict(frozen=True)

    code_version: str
    dataset_version: str
    model_version: str
    runtime_flags: dict[str, str]
    hardware: Hardware
    region: str
    timestamp: float
    timestamp_iso: str
    load_average_1m: float | None = Field(default=None, description="The host's 1-minute load average when "
                                          "recorded: a busy shared host explains a slow figure.")


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or UNAVAILABLE


def gpu_info() -> tuple[str, int, str]:
    """``(name, count, note)`` through :mod:`aifactory.telemetry`; ``("none", 0, "unknown (<reason>)")`` where
    NVML has no library, no driver or no GPU."""
    from aifactory import telemetry

    devices = telemetry.gpus(processes=False)
    if isinstance(devices, telemetry.Unknown):
        return "none", 0, str(devices)
    return devices[0].name, len(devices), ""


@lru_cache(maxsize=1)
def hardware() -> Hardware:
    from aifactory import telemetry

    total = telemetry.known(telemetry.host_memory_bytes())
    mem = None if total is None else round(total / 2**30, 1)
    name, count, note = gpu_info()
    return Hardware(
        cpu_model=cpu_model(), cpu_cores=os.cpu_count() or 0, memory_gib=mem, gpu_name=name, gpu_count=count,
        gpu_note=note, hostname=socket.gethostname(),
    )


def runtime_flags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Versions and the environment switches that change performance."""
    flags: dict[str, str] = {"python": platform.python_version()}
    for dist in ("ray", "torch"):
        try:  # package metadata: no need to import torch just to learn its version
            flags[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            flags[dist] = UNAVAILABLE
    for var in _FLAG_VARS:
        if var in os.environ:
            flags[var] = os.environ[var]
    for k, v in (extra or {}).items():
        flags[k] = str(v)
    return flags


def collect_context(
    *,
    dataset_version: str | None = None,
    model_version: str | None = None,
    region: str | None = None,
    flags: dict[str, Any] | None = None,
    now: float | None = None,
) -> BenchContext:
    """The context of a run on this node. Versions that do not apply are ``"none"``."""
    from aifactory.provenance import code_version

    ts = time.time() if now is None else now
    return BenchContext(
        code_version=str(code_version()),
        dataset_version=dataset_version or "none",
        model_version=model_version or "none",
        runtime_flags=runtime_flags(flags),
        hardware=hardware(),
        region=region or os.environ.get("AIFACTORY_REGION") or "local",
        timestamp=ts,
        timestamp_iso=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)),
        load_average_1m=_load_average(),
    )


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not every platform has one
        return None


class EnergyMeter:
    """GPU energy over an interval from NVML's total-energy counters; ``None`` where there is no GPU."""

    def __init__(self) -> None:
        self._start: list[int] | None = None
        self.note = ""

    def _read(self) -> list[float] | None:
        """Each device's energy counter in joules; None (and ``note`` says why) where there is none."""
        from aifactory import telemetry

        energy = telemetry.gpu_energy_j()  # no library / driver / GPU / counter: unavailable, not zero
        if isinstance(energy, telemetry.Unknown):
            self.note = str(energy)
            return None
        return energy

    def start(self) -> None:
        self._start = self._read()

    def stop_joules(self) -> float | None:
        end = self._read()
        if self._start is None or end is None:
            return None
        return sum(e - s for s, e in zip(self._start, end))
