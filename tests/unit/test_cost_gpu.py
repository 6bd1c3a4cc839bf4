"""Used GPU resources: NVML readings (plain records) attributed to the holders owning the processes; pure."""

import pytest

from aifactory.cost.collector import attach_used
from aifactory.cost.gpu import GpuDevice, GpuProcess, GpuUse, gpu_use, read_nvml
from aifactory.cost.records import UsageRecord


def dev(t, *, util=None, energy=None, power=None, procs=(), uuid="GPU-0", node="n1"):
    return GpuDevice(node_id=node, index=0, uuid=uuid, name="NVIDIA H200", t=t, util_pct=util,
                     memory_used_bytes=None, memory_total_bytes=141 * (1 << 30), power_w=power, energy_j=energy,
                     processes=tuple(procs))


OWNERS = {("n1", 101): "pg:train", ("n1", 202): "actor:replica", ("n2", 101): "task:t:0"}


def test_two_processes_split_by_sm_utilisation_energy_from_the_counter():
    before = [dev(100.0, util=60.0, energy=5000.0,
                  procs=[GpuProcess(101, 40 * (1 << 30), 30.0), GpuProcess(202, 10 * (1 << 30), 10.0)])]
    now = [dev(110.0, util=80.0, energy=9000.0,
               procs=[GpuProcess(101, 40 * (1 << 30), 45.0), GpuProcess(202, 20 * (1 << 30), 15.0)])]
    use = gpu_use(before, now, OWNERS)
    assert set(use) == {"pg:train", "actor:replica"}
    # device: mean utilisation 70% over 10 s = 7 GPU-s; 4000 J; split 45:15 by the latest SM shares
    assert use["pg:train"].gpu_s == pytest.approx(7.0 * 0.75)
    assert use["actor:replica"].gpu_s == pytest.approx(7.0 * 0.25)
    assert use["pg:train"].energy_j == pytest.approx(3000.0)
    assert use["actor:replica"].energy_j == pytest.approx(1000.0)
    # memory is each process's own: 40 GiB x 10 s, and the mean of 10 and 20 GiB x 10 s
    assert use["pg:train"].memory_gib_s == pytest.approx(400.0)
    assert use["actor:replica"].memory_gib_s == pytest.approx(150.0)
    total = sum(u.energy_j for u in use.values())
    assert total == pytest.approx(4000.0)  # nothing lost or counted twice


def test_unknown_processes_idle_devices_power_fallback_and_unknown_readings():
    before = [dev(0.0, util=50.0, power=300.0, procs=[GpuProcess(999, None, None)]),
              dev(0.0, util=0.0, energy=100.0, uuid="GPU-1"),
              dev(0.0, util=None, energy=None, uuid="GPU-2", node="n2", procs=[GpuProcess(101, None, None)])]
    now = [dev(10.0, util=50.0, power=500.0, procs=[GpuProcess(999, None, None)]),
           dev(10.0, util=0.0, energy=800.0, uuid="GPU-1"),
           dev(10.0, util=None, energy=None, uuid="GPU-2", node="n2", procs=[GpuProcess(101, None, None)]),
           dev(10.0, util=10.0, uuid="GPU-3")]  # first reading of a device: opens its interval only
    use = gpu_use(before, now, OWNERS)
    # a process no Ray worker owns (pid 999 on n1) is unattributed; no counter: mean power x time
    assert (use["unattributed"].gpu_s, use["unattributed"].energy_j) == (pytest.approx(5.0), pytest.approx(4000.0))
    assert use["unattributed"].memory_gib_s is None  # NVML did not report its memory: unknown, not 0
    assert use[""].energy_j == pytest.approx(700.0) and use[""].gpu_s == 0.0  # device without processes: idle
    # pid 101 on n2 is a task (pids are per node); its device reported nothing: unknown
    assert (use["task:t:0"].gpu_s, use["task:t:0"].energy_j) == (None, None)
    # weights fall back to memory, then to equal shares
    equal = gpu_use([dev(0.0, util=100.0, procs=[GpuProcess(101), GpuProcess(202)])],
                    [dev(4.0, util=100.0, procs=[GpuProcess(101), GpuProcess(202)])], OWNERS)
    assert equal["pg:train"].gpu_s == equal["actor:replica"].gpu_s == pytest.approx(2.0)
    by_mem = gpu_use([dev(0.0, util=100.0, procs=[GpuProcess(101, 3), GpuProcess(202, 1)])],
                     [dev(4.0, util=100.0, procs=[GpuProcess(101, 3), GpuProcess(202, 1)])], OWNERS)
    assert by_mem["pg:train"].gpu_s == pytest.approx(3.0)


def test_device_json_roundtrip_crosses_the_probe_boundary():
    d = dev(1.5, util=12.0, energy=3.0, procs=[GpuProcess(101, 5, 7.0)])
    assert GpuDevice.from_json(d.to_json()) == d


def test_gpu_use_on_ledger_records_split_like_allocation_unknown_elsewhere():
    def r(holder, resource, q, tenant="a", sku="H200"):
        return UsageRecord(window_start=0.0, window_end=60.0, tenant=tenant, holder=holder, resource=resource,
                           sku=sku if resource == "gpu" else "cpu", quantity_s=q)

    records = [
        r("actor:replica", "gpu", 45.0, tenant="a"), r("actor:replica", "gpu", 15.0, tenant="b"),  # shared 3:1
        r("actor:replica", "cpu", 60.0, tenant="a"),
        r("pg:train", "gpu", 120.0),
        r("", "gpu", 60.0, tenant="idle"),
    ]
    gpu = {"actor:replica": GpuUse("actor:replica", gpu_s=40.0, memory_gib_s=8 * 60.0, energy_j=12000.0),
           "pg:train": GpuUse("pg:train", gpu_s=None, memory_gib_s=None, energy_j=None)}
    out = attach_used(records, cpu_s={"actor:replica": 30.0}, gpu=gpu)
    a_gpu, b_gpu, a_cpu, train, idle = out
    assert (a_gpu.used_s, a_gpu.gpu_memory_gib_s, a_gpu.energy_j) == (30.0, 360.0, 9000.0)
    assert (b_gpu.used_s, b_gpu.energy_j) == (10.0, 3000.0)
    assert a_cpu.used_s == 30.0 and a_cpu.energy_j is None
    assert (train.used_s, train.energy_j) == (None, None)  # measured as unknown: stays unknown
    assert idle.used_s is None


def test_read_nvml_here_is_unknown_without_error():
    status, devices = read_nvml("node-x")
    if devices:  # a machine with a GPU: the records are plain and complete
        assert status.startswith("ok") and all(d.node_id == "node-x" and d.uuid for d in devices)
    else:
        assert status.startswith("unknown (")


def test_ledger_keeps_gpu_use_and_an_older_ledger_gains_the_columns(tmp_path):
    import sqlite3

    from aifactory.cost.ledger import Ledger

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE usage (
        key TEXT PRIMARY KEY, window_start REAL NOT NULL, window_end REAL NOT NULL,
        tenant TEXT NOT NULL, project TEXT NOT NULL, workload TEXT NOT NULL,
        job_id TEXT NOT NULL, deployment TEXT NOT NULL, holder TEXT NOT NULL,
        resource TEXT NOT NULL, sku TEXT NOT NULL, region TEXT NOT NULL, pricing_class TEXT NOT NULL,
        quantity_s REAL NOT NULL, used_s REAL, written_at REAL NOT NULL,
        pool TEXT NOT NULL DEFAULT 'default')""")
    db.execute("INSERT INTO usage VALUES ('k',0,60,'a','default','other','','','h','cpu','cpu','local',"
               "'on-demand',60,NULL,0,'default')")
    db.commit()
    db.close()
    led = Ledger(path)
    old = led.usage()
    assert len(old) == 1 and old[0].energy_j is None and old[0].gpu_memory_gib_s is None
    rec = UsageRecord(window_start=0.0, window_end=60.0, tenant="a", holder="pg:t", resource="gpu", sku="H200",
                      quantity_s=60.0, used_s=30.0, gpu_memory_gib_s=600.0, energy_j=4200.0)
    assert led.append([rec]) == 1
    got = [r for r in led.usage() if r.resource.value == "gpu"][0]
    assert (got.used_s, got.gpu_memory_gib_s, got.energy_j) == (30.0, 600.0, 4200.0)


def test_coverage_idle_allocated_gpu_is_zero_failed_node_is_unknown():
    from aifactory.cost.gpu import coverage

    owners = {("n1", 101): "pg:train", ("n2", 7): "actor:x", ("n3", 8): "task:cpu-only", ("n2", 9): "pg:train"}
    cov = coverage(owners, gpu_nodes=["n1", "n2"], measured=["n1"])
    assert "task:cpu-only" not in cov  # n3 has no GPU: nothing to say
    assert (cov["actor:x"].gpu_s, cov["actor:x"].energy_j) == (None, None)  # n2's reading failed
    assert cov["pg:train"].gpu_s is None  # a holder on a measured and an unmeasured node: unknown overall
    both = coverage(owners, gpu_nodes=["n1", "n2"], measured=["n1", "n2"])
    assert (both["actor:x"].gpu_s, both["actor:x"].memory_gib_s, both["actor:x"].energy_j) == (0.0, 0.0, 0.0)
    # measured figures add to the zeros
    total = both["actor:x"]
    total.add(GpuUse("actor:x", gpu_s=3.0, memory_gib_s=1.0, energy_j=50.0))
    assert (total.gpu_s, total.energy_j) == (3.0, 50.0)
