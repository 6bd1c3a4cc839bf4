"""Telemetry: what this node's GPUs (NVML) and processes (CPU time, RSS) report, behind one API.

Why one module: NVML was initialised in five places (the meter's probe, its status line, ``factory up``'s
GPU count, the benchmarks' context and their energy meter), and process CPU/RSS were read in two, each
with its own spelling of "unknown". Here NVML is initialised **once per process** (lazily, on the first
reading, under a lock; shut down at exit), and every reading that cannot be taken is one value,
:class:`Unknown`, that carries its reason: the NVML library is missing, there is no driver, no GPU, no
permission, the device does not support that counter, the process is gone. An ``Unknown`` is falsy and
prints as ``unknown (<reason>)``, which is what reports show; callers test ``isinstance(x, Unknown)``.

Base layer: imports nothing of ours. ``pynvml`` (nvidia-ml-py) and ``psutil`` are imported on first use.
On a machine without an NVIDIA driver ``nvmlInit`` raises ``NVMLError_LibraryNotFound`` at once
(../shared/RAY-2.60-NOTES.md, Metrics), so asking costs nothing there.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

# Reasons a reading is unknown (the text after "unknown (").
NO_LIBRARY = "no NVML library: nvidia-ml-py is not installed"
NO_GPU = "NVML sees no GPU"
NO_SUCH_PROCESS = "no such process"
NO_PERMISSION = "no permission"
NOT_SUPPORTED = "not supported by this device"

# NVML error classes (pynvml.NVMLError_<Name>) -> the reason reports show.
_NVML_REASONS = {
    "NVMLError_LibraryNotFound": "no NVIDIA driver: the NVML shared library was not found",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is not loaded",
    "NVMLError_LibRmVersionMismatch": "NVML and the kernel driver versions differ",
    "NVMLError_NoPermission": NO_PERMISSION,
    "NVMLError_NotSupported": NOT_SUPPORTED,
    "NVMLError_FunctionNotFound": "not in this driver's NVML",
    "NVMLError_NotFound": "not found",
    "NVMLError_GpuIsLost": "the GPU is lost (fell off the bus)",
    "NVMLError_NoData": "no data yet",
}
# NVML's "value not available" marker for a process's memory (e.g. without permission or under MIG).
_NVML_VALUE_NOT_AVAILABLE = 1 << 63  # NVML_VALUE_NOT_AVAILABLE is 2**64 - 1; no real reading is this large


@dataclass(frozen=True)
class Unknown:
    """A reading that could not be taken, and why. Falsy; prints as ``unknown (<reason>)``."""

    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"unknown ({self.reason})"


def known(value):
    """``value``, or None where it is :class:`Unknown` (for records that store unknown as null)."""
    return None if isinstance(value, Unknown) else value


def nvml_reason(err: BaseException) -> str:
    """The reason an NVML call failed, in words (``NVMLError_NoPermission`` -> "no permission")."""
    name = type(err).__name__
    if isinstance(err, ImportError):
        return NO_LIBRARY
    return _NVML_REASONS.get(name, f"{name}: {err}" if str(err) else name)


# --- NVML, initialised once ----------------------------------------------------------------------------


class _Nvml:
    """The process's one NVML session: ``pynvml`` after a successful ``nvmlInit``, else why not."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._result = None  # the pynvml module, or an Unknown; None: not tried yet
        self.init_calls = 0  # how many times nvmlInit was called in this process (at most 1)

    def get(self):
        with self._lock:
            if self._result is None:
                self._result = self._init()
            return self._result

    def _init(self):
        try:
            import pynvml
        except ImportError as err:
            return Unknown(nvml_reason(err))
        self.init_calls += 1
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            return Unknown(nvml_reason(err))
        atexit.register(self._shutdown, pynvml)
        return pynvml

    @staticmethod
    def _shutdown(pynvml) -> None:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - at exit: nothing left to report to
            pass


_NVML = _Nvml()


def nvml_init_calls() -> int:
    """How many times this process called ``nvmlInit`` (0 before the first reading, then 1)."""
    return _NVML.init_calls


def _read(nvml, call, *args):
    """One NVML call: its value, or :class:`Unknown` with the reason NVML gave."""
    try:
        return call(*args)
    except nvml.NVMLError as err:
        return Unknown(nvml_reason(err))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class GpuProcessReading:
    """One process on a GPU: its device memory and its share of the SM time over the last second."""

    pid: int
    memory_bytes: int | Unknown
    sm_util_pct: float | Unknown


@dataclass(frozen=True)
class GpuReading:
    """One device at time ``t`` (Unix seconds)."""

    index: int
    uuid: str
    name: str
    t: float
    util_pct: float | Unknown
    memory_used_bytes: int | Unknown
    memory_total_bytes: int | Unknown
    power_w: float | Unknown
    energy_j: float | Unknown  # cumulative since the driver loaded
    processes: tuple[GpuProcessReading, ...] | Unknown


def gpu_count() -> int | Unknown:
    """GPUs NVML sees on this node (it ignores ``CUDA_VISIBLE_DEVICES``), or why it cannot say."""
    nvml = _NVML.get()
    if isinstance(nvml, Unknown):
        return nvml
    return _read(nvml, lambda: int(nvml.nvmlDeviceGetCount()))


def gpu_status() -> str:
    """One line for status output: ``ok (N devices)`` or ``unknown (<reason>)``."""
    n = gpu_count()
    if isinstance(n, Unknown):
        return str(n)
    return f"ok ({n} devices)" if n else str(Unknown(NO_GPU))


def gpus(*, processes: bool = True) -> list[GpuReading] | Unknown:
    """Every device on this node with utilisation, memory, power, energy and (``processes``) per-process
    memory and SM utilisation; :class:`Unknown` without NVML or without any GPU. Each reading a device does
    not support is an ``Unknown`` of its own."""
    nvml = _NVML.get()
    if isinstance(nvml, Unknown):
        return nvml
    n = _read(nvml, nvml.nvmlDeviceGetCount)
    if isinstance(n, Unknown):
        return n
    if not n:
        return Unknown(NO_GPU)
    out = []
    for i in range(int(n)):
        h = _read(nvml, nvml.nvmlDeviceGetHandleByIndex, i)
        if isinstance(h, Unknown):
            return h
        t = time.time()
        util = _read(nvml, lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))
        mem = _read(nvml, nvml.nvmlDeviceGetMemoryInfo, h)
        power_mw = _read(nvml, nvml.nvmlDeviceGetPowerUsage, h)
        energy_mj = _read(nvml, nvml.nvmlDeviceGetTotalEnergyConsumption, h)
        out.append(GpuReading(
            index=i, uuid=_text(_read(nvml, nvml.nvmlDeviceGetUUID, h)), name=_text(_read(nvml, nvml.nvmlDeviceGetName, h)),
            t=t, util_pct=util,
            memory_used_bytes=mem if isinstance(mem, Unknown) else int(mem.used),
            memory_total_bytes=mem if isinstance(mem, Unknown) else int(mem.total),
            power_w=power_mw if isinstance(power_mw, Unknown) else power_mw / 1000.0,
            energy_j=energy_mj if isinstance(energy_mj, Unknown) else energy_mj / 1000.0,
            processes=_gpu_processes(nvml, h, t) if processes else Unknown("not read"),
        ))
    return out


def _gpu_processes(nvml, handle, t: float) -> tuple[GpuProcessReading, ...] | Unknown:
    mem: dict[int, int | Unknown] = {}
    listed = []
    for getter in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        procs = _read(nvml, getter, handle)
        listed.append(procs)
        for p in [] if isinstance(procs, Unknown) else procs:
            used = getattr(p, "usedGpuMemory", None)
            # NVML_VALUE_NOT_AVAILABLE (2**64 - 1) where it may not read a process's memory
            mem[int(p.pid)] = (int(used) if used is not None and used < _NVML_VALUE_NOT_AVAILABLE
                               else Unknown(NO_PERMISSION if used is not None else NOT_SUPPORTED))
    if all(isinstance(x, Unknown) for x in listed):
        return listed[0]
    # Per-process SM utilisation over the last ~second of samples (not on every device or driver).
    samples = _read(nvml, nvml.nvmlDeviceGetProcessUtilization, handle, int((t - 1.0) * 1e6))
    sm: dict[int, float] = {}
    for s in [] if isinstance(samples, Unknown) else samples:
        sm[int(s.pid)] = max(sm.get(int(s.pid), 0.0), float(s.smUtil))
    no_sm = samples if isinstance(samples, Unknown) else Unknown("no sample in the last second")
    return tuple(GpuProcessReading(pid, mem.get(pid, Unknown(NOT_SUPPORTED)), sm.get(pid, no_sm))
                 for pid in sorted(set(mem) | set(sm)))


def gpu_energy_j() -> list[float] | Unknown:
    """Each device's cumulative energy counter (joules), or why it cannot be read (no GPU, no counter)."""
    devices = gpus(processes=False)
    if isinstance(devices, Unknown):
        return devices
    for d in devices:
        if isinstance(d.energy_j, Unknown):
            return d.energy_j
    return [float(d.energy_j) for d in devices]


# --- processes and the host ----------------------------------------------------------------------------


def _psutil_reason(err: BaseException) -> str:
    return NO_PERMISSION if type(err).__name__ == "AccessDenied" else NO_SUCH_PROCESS


def cpu_seconds(pids: Iterable[int], *, children: bool = True) -> float | Unknown:
    """User + system CPU seconds of ``pids`` (and their live children): unknown if none can be read."""
    import psutil

    total, seen, why = 0.0, False, NO_SUCH_PROCESS
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)] if children else [p]
        except (psutil.NoSuchProcess, psutil.AccessDenied) as err:
            why = _psutil_reason(err)
            continue
        for proc in procs:
            try:
                ct = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied) as err:
                why = _psutil_reason(err)
                continue
            total += ct.user + ct.system
            seen = True
    return total if seen else Unknown(why)


def rss_bytes(pid: int | None = None) -> int | Unknown:
    """Resident set size of ``pid`` (default: this process), or why it cannot be read."""
    pid = os.getpid() if pid is None else pid
    try:  # /proc is cheaper than psutil and needs no import (training samples it every step)
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return Unknown(NO_SUCH_PROCESS)
    except OSError as err:
        return Unknown(f"{type(err).__name__}: {err}")
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied) as err:
        return Unknown(_psutil_reason(err))


def host_memory_bytes() -> int | Unknown:
    """Total memory of this node."""
    try:
        import psutil
    except ImportError:
        return Unknown("psutil is not installed")
    return int(psutil.virtual_memory().total)
