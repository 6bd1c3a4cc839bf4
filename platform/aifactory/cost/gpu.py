"""Used GPU resources from NVML, per device and per process, attributed to the holders that own the processes.

Two halves that never mix:

- :func:`read_nvml` turns :mod:`aifactory.telemetry`'s readings of *this node's* GPUs (NVML sees no other
  node's, and ignores ``CUDA_VISIBLE_DEVICES``) into plain :class:`GpuDevice` records, or returns an
  "unknown (<reason>)" status and no devices where NVML is missing (no library, no driver, no GPU). Where
  a reading is not supported by a device it is ``None`` and stays unknown downstream.
- :func:`gpu_use` is pure: two consecutive readings of a node and the owners of its worker processes
  (from the state API: worker pid -> holder) give each holder's used GPU-seconds (utilisation x time),
  GPU memory GiB-seconds and energy in joules over the interval. Unit tests feed it records.

In a cluster the reading runs on every GPU node in a small zero-resource :func:`probe_class` actor pinned
to that node (``NodeAffinitySchedulingStrategy(soft=False)``); the collector starts one per node whose Ray
resources include ``GPU`` and reads them each sample (see :class:`GpuMeter`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aifactory import telemetry
from aifactory.cost.sampler import GIB

log = logging.getLogger("aifactory.cost")

UNKNOWN_OWNER = "unattributed"  # a process on a GPU that no Ray worker of the cluster owns
PROBE_PREFIX = "aifactory-gpu-probe-"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    memory_bytes: int | None = None  # None: NVML does not say (e.g. without permission)
    sm_util_pct: float | None = None  # this process's share of the device's SM time; None: not reported


@dataclass(frozen=True)
class GpuDevice:
    """One device at time ``t`` (Unix seconds), as NVML reported it."""

    node_id: str
    index: int
    uuid: str
    name: str
    t: float
    util_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_w: float | None = None
    energy_j: float | None = None  # cumulative counter since the driver loaded
    processes: tuple[GpuProcess, ...] = ()

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("node_id", "index", "uuid", "name", "t", "util_pct", "memory_used_bytes",
                                           "memory_total_bytes", "power_w", "energy_j")}
        d["processes"] = [[p.pid, p.memory_bytes, p.sm_util_pct] for p in self.processes]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> GpuDevice:
        d = dict(d)
        d["processes"] = tuple(GpuProcess(*p) for p in d.get("processes", ()))
        return cls(**d)


@dataclass
class GpuUse:
    """What one holder used on GPUs over an interval. ``None``: that reading is unknown."""

    holder: str
    gpu_s: float | None = 0.0  # utilisation x seconds (1 GPU busy for 10 s = 10)
    memory_gib_s: float | None = 0.0
    energy_j: float | None = 0.0
    devices: set[str] = field(default_factory=set)

    def add(self, other: GpuUse) -> None:
        for name in ("gpu_s", "memory_gib_s", "energy_j"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(self, name, None if a is None or b is None else a + b)
        self.devices |= other.devices


def read_nvml(node_id: str) -> tuple[str, list[GpuDevice]]:
    """This node's GPUs: ("ok (N devices)", devices), or ("unknown (why)", []) where NVML cannot be used.

    The readings come from :func:`aifactory.telemetry.gpus`; one that a device does not support becomes
    ``None`` here (the records' "unknown", which stays unknown downstream)."""
    readings = telemetry.gpus()
    if isinstance(readings, telemetry.Unknown):
        return str(readings), []
    known = telemetry.known
    devices = [GpuDevice(
        node_id=node_id, index=r.index, uuid=r.uuid, name=r.name, t=r.t, util_pct=known(r.util_pct),
        memory_used_bytes=known(r.memory_used_bytes), memory_total_bytes=known(r.memory_total_bytes),
        power_w=known(r.power_w), energy_j=known(r.energy_j),
        processes=tuple(GpuProcess(p.pid, known(p.memory_bytes), known(p.sm_util_pct))
                        for p in (known(r.processes) or ())),
    ) for r in readings]
    return f"ok ({len(devices)} devices)", devices


def gpu_use(before: Sequence[GpuDevice], now: Sequence[GpuDevice],
            owners: Mapping[tuple[str, int], str]) -> dict[str, GpuUse]:
    """Each holder's GPU use between two readings of the same node(s); pure.

    ``owners``: (node id, pid) -> holder, from the state API's worker pids. A device's utilisation-seconds
    and energy go to its processes in proportion to their SM utilisation where NVML reports it, else to
    their memory, else equally; processes no holder owns go to ``unattributed``; a device with no
    process gives its energy to the holder ``""`` (idle). Memory GiB-seconds are each process's own.
    The interval is the device's ``t`` difference; utilisation and memory are taken as the mean of the
    two readings; energy is the counter's difference (or mean power x time without a counter).
    """
    prev = {(d.node_id, d.uuid): d for d in before}
    out: dict[str, GpuUse] = {}

    def add(holder: str, use: GpuUse) -> None:
        out.setdefault(holder, GpuUse(holder)).add(use)

    for d in now:
        p = prev.get((d.node_id, d.uuid))
        if p is None or d.t <= p.t:
            continue  # the first reading of a device only opens its interval
        dt = d.t - p.t
        util = _mean(p.util_pct, d.util_pct)
        device_gpu_s = None if util is None else util / 100.0 * dt
        if d.energy_j is not None and p.energy_j is not None and d.energy_j >= p.energy_j:
            energy = d.energy_j - p.energy_j
        else:
            power = _mean(p.power_w, d.power_w)
            energy = None if power is None else power * dt
        procs = d.processes
        if not procs:
            add("", GpuUse("", gpu_s=device_gpu_s, memory_gib_s=0.0, energy_j=energy, devices={d.uuid}))
            continue
        weights = _weights(procs)
        for proc, w in zip(procs, weights):
            before_mem = next((q.memory_bytes for q in p.processes if q.pid == proc.pid), proc.memory_bytes)
            mem = _mean(before_mem, proc.memory_bytes)
            holder = owners.get((d.node_id, proc.pid), UNKNOWN_OWNER)
            add(holder, GpuUse(
                holder,
                gpu_s=None if device_gpu_s is None else device_gpu_s * w,
                memory_gib_s=None if mem is None else mem / GIB * dt,
                energy_j=None if energy is None else energy * w,
                devices={d.uuid},
            ))
    return out


def coverage(owners: Mapping[tuple[str, int], str], gpu_nodes: Sequence[str],
             measured: Sequence[str]) -> dict[str, GpuUse]:
    """What NVML's silence means for each holder with a process on a GPU node; pure.

    On a node measured over the interval, a holder with no process on a GPU used none (0, not unknown:
    an allocated, idle GPU is what utilisation must show). On a GPU node whose reading failed, the
    holder's use is unknown. Add :func:`gpu_use`'s figures to these.
    """
    out: dict[str, GpuUse] = {}
    gpu, ok = set(gpu_nodes), set(measured)
    for (node_id, _pid), holder in owners.items():
        if node_id not in gpu:
            continue
        figures = (0.0, 0.0, 0.0) if node_id in ok else (None, None, None)
        out.setdefault(holder, GpuUse(holder)).add(GpuUse(holder, *figures))
    return out


def _mean(a: float | None, b: float | None) -> float | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        return float(a if b is None else b)
    return (a + b) / 2.0


def _weights(procs: Sequence[GpuProcess]) -> list[float]:
    for values in ([p.sm_util_pct for p in procs], [p.memory_bytes for p in procs]):
        if all(v is not None for v in values) and sum(values) > 0:
            total = float(sum(values))
            return [v / total for v in values]
    return [1.0 / len(procs)] * len(procs)


@functools.cache  # one remote class per process: each new one is exported to the cluster again
def probe_class():
    """A zero-resource actor that reads NVML on the node it is pinned to."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=0, max_restarts=-1)
    class GpuProbe:
        def __init__(self, node_id: str):
            self.node_id = node_id

        def read(self) -> tuple[str, list[dict]]:
            status, devices = read_nvml(self.node_id)
            return status, [d.to_json() for d in devices]

        def where(self) -> str:
            """The node this probe runs on (it must be the one it reads for)."""
            return ray.get_runtime_context().get_node_id()

    return GpuProbe


class GpuMeter:
    """The collector's view of every GPU node: one probe per node with GPUs, read once per sample.

    :meth:`sample` returns the holders' use since the previous sample (with :func:`coverage`'s zeros
    and unknowns for holders NVML saw no process of) and a status per node. Nodes without
    GPUs have no probe; where no node has any, the status is the local NVML's "unknown (...)".
    """

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._probes: dict[str, object] = {}
        self._last: dict[str, list[GpuDevice]] = {}
        self.status: dict[str, str] = {}
        self.measured: list[str] = []  # nodes whose last sample measured an interval

    def sample(self, gpu_nodes: Sequence[str], owners: Mapping[tuple[str, int], str], *,
               timeout_s: float = 10.0) -> dict[str, GpuUse]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for node_id in [n for n in self._probes if n not in gpu_nodes]:  # node gone
            self._probes.pop(node_id)
            self._last.pop(node_id, None)
            self.status.pop(node_id, None)
        refs = {}
        for node_id in gpu_nodes:
            if node_id not in self._probes:
                self._probes[node_id] = probe_class().options(
                    name=PROBE_PREFIX + node_id, namespace=self.namespace, get_if_exists=True, lifetime="detached",
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(node_id)
            refs[node_id] = self._probes[node_id].read.remote()
        use: dict[str, GpuUse] = {}
        self.measured = []
        for node_id, ref in refs.items():
            try:
                status, rows = ray.get(ref, timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - this node's GPU use is unknown for this interval
                self.status[node_id] = f"unknown ({type(err).__name__})"
                self._last.pop(node_id, None)
                continue
            self.status[node_id] = status
            devices = [GpuDevice.from_json(r) for r in rows]
            if node_id in self._last and status.startswith("ok"):
                self.measured.append(node_id)
            for holder, u in gpu_use(self._last.get(node_id, []), devices, owners).items():
                use.setdefault(holder, GpuUse(holder)).add(u)
            self._last[node_id] = devices
        for holder, u in coverage(owners, gpu_nodes, self.measured).items():
            use.setdefault(holder, GpuUse(holder)).add(u)
        return use

    def stop(self) -> None:
        import ray

        for handle in self._probes.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        self._probes.clear()
