"""CI runs the CUDA kernels without a GPU: csrc/kernels/cuda's element-wise and reduction
kernels (bias_relu, relu_grad, mse_loss, adam), compiled as C++ against the CUDA stand-in in
tests/cuda_emulator (fibers for threads, barriers, warp shuffles), are compared with plain
PyTorch by tests/cuda_emulator/kernel_checks.py, in a process with AddressSanitizer and
UndefinedBehaviorSanitizer, so a wrong number, a read or write past a buffer or an index
past an array fails here. The tensor-core GEMMs (CUTLASS) are not emulated; they and the
torch glue run on a GPU only (scripts/gpu_check.sh)."""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, "cuda_emulator")
sys.path.insert(0, EMULATOR)
import build_kernels as build  # noqa: E402  (tests/cuda_emulator/build_kernels.py)


def _why_not():
    if not sys.platform.startswith("linux"):
        return "the emulator's fibers use ucontext (Linux)"
    if build.compiler() is None:
        return "no C++ compiler"
    if build.cuda_include() is None:
        return "no CUDA runtime headers (the CUDA toolkit, or CUDA_HOME)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def _sanitized_env(lib):
    asan = build.asan_preload()
    preload = " ".join(p for p in (asan, os.environ.get("LD_PRELOAD")) if p)
    return dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0", AIAAS_FAST_EMULATED_KERNELS=lib)


@pytest.fixture(scope="module")
def library():
    if build.asan_preload() is None:
        pytest.skip("the compiler has no AddressSanitizer runtime (libasan)")
    return build.build(asan=True)


def test_cuda_kernels_emulated_on_the_cpu_match_pytorch(library):
    # --capture=sys: a sanitizer's report goes to the real stderr, not to a capture file
    # that dies with the process.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider",
                           os.path.join(EMULATOR, "kernel_checks.py")],
                          cwd=os.path.dirname(HERE), env=_sanitized_env(library), capture_output=True, text=True,
                          timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-30000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 300 and "skipped" not in summary, out[-5000:]


def test_the_sanitizer_stops_a_kernel_writing_past_its_buffer(library):
    # The emulated run is only as strict as its sanitizer: a bias_relu told the buffer has one
    # row more than it has must stop the process with the kernel's file and line.
    code = (f"import ctypes, torch; lib = ctypes.CDLL({library!r}); out = torch.zeros(10, 3); "
            "lib.emu_bias_relu(0, ctypes.c_void_p(out.data_ptr()), None, ctypes.c_int64(11), ctypes.c_int64(3))")
    proc = subprocess.run([sys.executable, "-c", code], env=_sanitized_env(library), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in proc.stderr and "csrc/kernels/cuda/linear_relu.cu" in proc.stderr, proc.stderr[-5000:]
