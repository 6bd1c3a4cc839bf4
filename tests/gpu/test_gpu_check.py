"""NCCL + FSDP2 bf16-mixed on a real GPU (skipped where CUDA is absent)."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_check_trains_with_nccl_and_bf16():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--steps", "10"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_check: OK" in proc.stdout and '"backend": "nccl"' in proc.stdout
    assert proc.stdout.count('"compute_param_dtype": "bfloat16"') == proc.stdout.count('"rank":') >= 1
