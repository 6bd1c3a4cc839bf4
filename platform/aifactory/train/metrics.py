"""Per-run measurements: throughput, data wait vs compute, peak memory, checkpoint time and MFU.

MFU = achieved model FLOP/s / the device's peak FLOP/s. Model FLOPs are the PaLM estimate
(:meth:`GPTConfig.train_flops_per_token`). Peaks come from :data:`PEAK_FLOPS` (dense, no sparsity); a
device or precision not in the table reports MFU as ``"unknown"`` rather than a made-up number. The CPU
entry is a nominal peak (cores x clock x FLOPs/cycle of the vector units); it says so in ``peak_source``.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass

# Dense peak FLOP/s per device from the vendors' datasheets (no 2:4 sparsity). bf16-mixed uses the bf16
# tensor-core peak; fp32 uses TF32 tensor cores where PyTorch may use them, so it is listed separately.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16-mixed": 989.4e12, "fp32": 494.7e12},
    "h100 sxm": {"bf16-mixed": 989.4e12, "fp32": 494.7e12},
    "h100 nvl": {"bf16-mixed": 835.5e12, "fp32": 417.5e12},
    "h100 pcie": {"bf16-mixed": 756.5e12, "fp32": 378.0e12},
    "h100": {"bf16-mixed": 989.4e12, "fp32": 494.7e12},
    "a100": {"bf16-mixed": 312.0e12, "fp32": 156.0e12},
}

# FLOPs per cycle per core of the widest FMA units (2 FMA pipes x lanes x 2 FLOPs), fp32. Without AMX a
# CPU has no faster bf16 path, so bf16-mixed gets the same nominal peak.
CPU_FLOPS_PER_CYCLE = {"avx512f": 64, "avx2": 32, "sse2": 8}


@dataclass(frozen=True)
class Peak:
    flops: float | None
    source: str


def _cpu_info() -> tuple[str, float | None]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "sse2", None
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    isa = next((k for k in CPU_FLOPS_PER_CYCLE if k in flags), "sse2")
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    return isa, float(mhz.group(1)) / 1e3 if mhz else None


def peak_flops(device_name: str, precision: str, *, cpu_cores: float = 1.0) -> Peak:
    """The peak FLOP/s of one worker's device, or ``Peak(None, ...)`` when it is not known."""
    name = device_name.lower()
    if name == "cpu":
        isa, ghz = _cpu_info()
        if ghz is None:
            return Peak(None, "cpu: clock unknown")
        flops = cpu_cores * ghz * 1e9 * CPU_FLOPS_PER_CYCLE[isa]
        return Peak(flops, f"cpu nominal: {cpu_cores:g} cores x {ghz:.2f} GHz x {CPU_FLOPS_PER_CYCLE[isa]} FLOP/cycle ({isa})")
    for key, by_precision in PEAK_FLOPS.items():  # most specific keys first
        if key in name and precision in by_precision:
            return Peak(by_precision[precision], f"table: {key} {precision} dense")
    return Peak(None, f"no peak known for {device_name!r} at {precision}")


def mfu(*, tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | str:
    """Model FLOPs utilisation in [0, 1], or ``"unknown"`` without a peak."""
    if not peak or peak <= 0:
        return "unknown"
    return tokens_per_s * flops_per_token / peak


def rss_bytes() -> int:
    """Current resident set size of this process (:func:`aifactory.telemetry.rss_bytes`; 0 if unknown)."""
    from aifactory import telemetry

    return telemetry.known(telemetry.rss_bytes()) or 0


def _vm_hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark of this process (VmHWM), or None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_bytes() is not None
    except OSError:
        return False


class TrainingPeakMemory:
    """Peak memory of the training steps, absolute and above the memory in use before the model was built.

    ``baseline()`` is called right before model construction; ``start()`` once setup (model, optimizer,
    resume, validation data) is done, and again after each checkpoint save; ``peak()`` is the largest
    high-water mark of the windows measured so far. So the figure covers training steps and evaluation
    (forward, backward, optimizer step and its lazily created Adam state, FSDP's transient all-gathers) and
    leaves out setup and checkpoint saving.

    - CPU: the process's RSS high-water mark. Peak RSS over the process's life (``ru_maxrss``) would also
      count the torch/Ray import and any transient during setup, so the kernel's mark is reset at each
      ``start()`` (``/proc/self/clear_refs``) and read from ``VmHWM``; where that is not allowed, a daemon
      thread samples the RSS every ``sample_s`` instead (may miss spikes shorter than that).
      ``above_baseline = peak - RSS at baseline()``: what the model, its training state and activations add.
    - CUDA: ``torch.cuda.max_memory_allocated`` since ``torch.cuda.reset_peak_memory_stats`` at ``start()``;
      the baseline is ``memory_allocated`` at ``baseline()`` (usually 0).
    """

    def __init__(self, device_type: str, *, sample_s: float = 0.005):
        self.device_type = device_type
        self.sample_s = sample_s
        self.baseline_bytes = 0
        self._peak = 0
        self._kernel_hwm: bool | None = None
        self._sampled = 0  # the sampler thread's running maximum (when the kernel mark cannot be reset)
        self.setup_peak_bytes: int | None = None
        self.method = "cuda max_memory_allocated" if device_type == "cuda" else None

    def baseline(self) -> int:
        if self.device_type == "cuda":
            import torch

            self.baseline_bytes = int(torch.cuda.memory_allocated())
        else:
            self.baseline_bytes = rss_bytes()
        return self.baseline_bytes

    def start(self) -> None:
        """Begin a window: fold the open window's peak in, then reset the high-water mark."""
        self._fold()
        if self.device_type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        if self._kernel_hwm is None:
            self.setup_peak_bytes = peak_memory_bytes("cpu")  # before the first reset: includes setup's transients
            self._kernel_hwm = _reset_hwm()
            self.method = "VmHWM reset via /proc/self/clear_refs" if self._kernel_hwm else f"RSS sampled every {self.sample_s * 1e3:g} ms"
            if not self._kernel_hwm:
                self._start_sampler()
        elif self._kernel_hwm:
            _reset_hwm()
        else:
            self._sampled = rss_bytes()

    def _start_sampler(self) -> None:
        import threading

        self._sampled = rss_bytes()

        def sample() -> None:
            while True:
                self._sampled = max(self._sampled, rss_bytes())
                time.sleep(self.sample_s)

        threading.Thread(target=sample, name="aif-rss-sampler", daemon=True).start()

    def _window_peak(self) -> int:
        if self.device_type == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated())
        if self._kernel_hwm:
            return _vm_hwm_bytes() or 0
        return max(self._sampled, rss_bytes()) if self._kernel_hwm is False else 0

    def _fold(self) -> None:
        self._peak = max(self._peak, self._window_peak())

    def peak(self) -> int:
        """Largest memory in use during the measured windows (bytes)."""
        self._fold()
        return self._peak

    def above_baseline(self) -> int:
        return max(self.peak() - self.baseline_bytes, 0)


def peak_memory_bytes(device_type: str) -> int:
    """Peak memory over the process's life: CUDA allocator peak on GPU, peak RSS (ru_maxrss) on CPU.

    Includes imports and setup transients; :class:`TrainingPeakMemory` measures the training steps alone."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RayTrainMetrics:
    """Per-worker training metrics through ``ray.util.metrics`` (exported with Ray's ``ray_`` prefix)."""

    def __init__(self, *, tenant: str, run_id: str, rank: int):
        from ray.util.metrics import Counter, Gauge

        self._tags = {"tenant": tenant, "run_id": run_id, "rank": str(rank)}
        keys = tuple(self._tags)
        self.tokens = Counter("aifactory_train_tokens_total", "Tokens trained on.", keys)
        self.steps = Counter("aifactory_train_steps_total", "Optimizer steps.", keys)
        self.data_wait = Counter("aifactory_train_data_wait_seconds_total", "Seconds waiting for data.", keys)
        self.compute = Counter("aifactory_train_compute_seconds_total", "Seconds of forward/backward/step.", keys)
        self.tokens_per_s = Gauge("aifactory_train_tokens_per_second", "Recent tokens/s of this worker.", keys)
        self.mfu = Gauge("aifactory_train_mfu", "Model FLOPs utilisation of this worker (0-1).", keys)
        self.peak_memory = Gauge("aifactory_train_peak_memory_bytes", "Peak memory of this worker.", keys)
        self.loss = Gauge("aifactory_train_loss", "Latest training loss.", keys)
        self.val_loss = Gauge("aifactory_train_val_loss", "Latest validation loss.", keys)
        self.ckpt_save = Gauge("aifactory_train_checkpoint_save_seconds", "Latest checkpoint save time.", keys)

    def step(self, *, tokens: int, wait_s: float, compute_s: float, loss: float) -> None:
        self.tokens.inc(tokens, tags=self._tags)
        self.steps.inc(1, tags=self._tags)
        self.data_wait.inc(max(wait_s, 0.0), tags=self._tags)
        self.compute.inc(max(compute_s, 0.0), tags=self._tags)
        self.loss.set(loss, tags=self._tags)

    def summary(self, *, tokens_per_s: float, mfu_value, peak_bytes: int) -> None:
        self.tokens_per_s.set(tokens_per_s, tags=self._tags)
        if isinstance(mfu_value, float):
            self.mfu.set(mfu_value, tags=self._tags)
        self.peak_memory.set(peak_bytes, tags=self._tags)

    def checkpoint(self, *, save_s: float, val_loss: float) -> None:
        self.ckpt_save.set(save_s, tags=self._tags)
        self.val_loss.set(val_loss, tags=self._tags)
