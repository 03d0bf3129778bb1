"""CI's CUDA build check: every torch-free kernel in csrc/kernels/cuda compiles with nvcc
for sm_80 and sm_90 (and the glue in csrc/cuda against torch's headers), without a GPU.
A kernel that does not compile fails here. Skipped only where there is no nvcc."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cuda_kernels.sh")


def _nvcc():
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    found = shutil.which("nvcc")
    if found:
        return found
    for c in ["/usr/local/cuda/bin/nvcc"]:
        if os.path.exists(c):
            return c
    return None


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine: the CUDA kernels cannot be compiled here")
def test_every_cuda_kernel_compiles_with_nvcc():
    env = dict(os.environ, PYTHON=sys.executable, NVCC=_nvcc())
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    kernels = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "kernels", "cuda")) if f.endswith(".cu"))
    for k in kernels:
        assert f"ok    csrc/kernels/cuda/{k}" in out, out
    if "CUTLASS: absent" in out:
        pytest.skip("kernels compiled, but without CUTLASS headers (none installed and the wheel could not be fetched): "
                    "linear_relu_gemm.cu's CUTLASS path was not checked\n" + out)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_cuda_benchmark_says_plainly_that_there_is_no_gpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda_ops.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1
    assert "no CUDA GPU here" in proc.stderr and "nothing measured" in proc.stderr
