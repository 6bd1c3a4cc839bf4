"""Context: hardware from /proc/cpuinfo and NVML, recorded as 'none' where NVML has no GPU."""

from aifactory.bench.context import EnergyMeter, collect_context, cpu_model, gpu_info


def test_cpu_model_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_model(str(f)) == "Intel(R) Xeon(R) Platinum 8480+"


def test_gpu_is_named_or_recorded_as_none_with_a_reason():
    name, count, note = gpu_info()
    if count == 0:
        assert name == "none" and note  # e.g. "NVML unavailable: NVMLError_LibraryNotFound"
    else:
        assert name and name != "none"


def test_context_has_every_field_and_energy_is_unavailable_without_a_gpu():
    ctx = collect_context(dataset_version="ds-1", region="eu-west-1", now=0.0)
    assert ctx.dataset_version == "ds-1" and ctx.model_version == "none" and ctx.region == "eu-west-1"
    assert ctx.code_version and ctx.hardware.cpu_model and ctx.hardware.cpu_cores >= 1
    assert ctx.runtime_flags["ray"] == "2.60.0" and ctx.timestamp_iso == "1970-01-01T00:00:00Z"
    meter = EnergyMeter()
    meter.start()
    joules = meter.stop_joules()
    if ctx.hardware.gpu_count == 0:
        assert joules is None and meter.note
