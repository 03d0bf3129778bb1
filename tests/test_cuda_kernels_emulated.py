"""CI runs the CUDA kernels without a GPU: csrc/kernels/cuda's element-wise and reduction
kernels (bias_relu, relu_grad, mse_loss, adam), compiled as C++ against the CUDA stand-in in
tests/cuda_emulator (fibers for threads, barriers, warp shuffles), are compared with plain
PyTorch by tests/cuda_emulator/kernel_checks.py, twice:
- built with AddressSanitizer and UndefinedBehaviorSanitizer (a process with libasan
  preloaded): a read or write past a buffer, a misaligned vector access or an index past an
  array stops the run with the kernel's file and line;
- built with the kernel code's loads and stores reported to the emulator's race detector
  (race.cpp): two threads of a block between the same barriers, or two blocks, touching one
  byte with a write among them, or a read of __shared__ memory the block never wrote, fail.
The tensor-core GEMMs (CUTLASS) are not emulated; they and the torch glue run on a GPU only
(scripts/gpu_check.sh). AIAAS_FAST_REQUIRE_EMULATOR=1 (.ci/run) turns a skip into a failure."""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, "cuda_emulator")
CHECKS = os.path.join(EMULATOR, "kernel_checks.py")
sys.path.insert(0, EMULATOR)
import build_kernels as build  # noqa: E402  (tests/cuda_emulator/build_kernels.py)


def _why_not():
    if not sys.platform.startswith("linux"):
        return "the emulator's fibers use ucontext (Linux)"
    if build.compiler() is None:
        return "no C++ compiler"
    if build.cuda_include() is None:
        return "no CUDA runtime headers (the CUDA toolkit, or CUDA_HOME)"
    if build.asan_preload() is None:
        return "the compiler has no AddressSanitizer runtime (libasan)"
    return None


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _can_run():
    why = _why_not()
    if why is None:
        return
    if os.environ.get("AIAAS_FAST_REQUIRE_EMULATOR") == "1":
        pytest.fail(f"the CUDA emulator cannot run here ({why}) and AIAAS_FAST_REQUIRE_EMULATOR=1")
    pytest.skip(why)


def _env(lib, asan):
    env = dict(os.environ, AIAAS_FAST_EMULATED_KERNELS=lib)
    if asan:
        env["LD_PRELOAD"] = " ".join(p for p in (build.asan_preload(), os.environ.get("LD_PRELOAD")) if p)
        env["ASAN_OPTIONS"] = ":".join(o for o in ("detect_leaks=0", os.environ.get("ASAN_OPTIONS")) if o)
    return env


def _run_checks(lib, asan, *pytest_args):
    # --capture=sys: a sanitizer's report goes to the real stderr, not to a capture file
    # that dies with the process.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider", CHECKS,
                           *pytest_args], cwd=os.path.dirname(HERE), env=_env(lib, asan), capture_output=True,
                          text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-30000:]
    summary = proc.stdout.strip().splitlines()[-1]
    return summary, out


def test_cuda_kernels_emulated_with_sanitizers_match_pytorch():
    summary, out = _run_checks(build.build("asan"), True)
    passed = re.search(r"(\d+) passed", summary)
    # one skip: the race detector's own test, for the other build
    assert passed and int(passed.group(1)) >= 380 and re.search(r"\b1 skipped", summary), out[-5000:]


def test_cuda_kernels_have_no_data_races():
    # every check but the 21M-element Adam one (the detector keeps a record per byte)
    summary, out = _run_checks(build.build("race"), False, "-k", "not longer_than_one_launch")
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 380 and "skipped" not in summary, out[-5000:]


def test_the_sanitizer_stops_a_kernel_writing_past_its_buffer():
    # The emulated run is only as strict as its sanitizer: a bias_relu told the buffer has one
    # row more than it has must stop the process with the kernel's file and line.
    lib = build.build("asan")
    code = (f"import ctypes, torch; lib = ctypes.CDLL({lib!r}); out = torch.zeros(10, 3); "
            "lib.emu_bias_relu(0, ctypes.c_void_p(out.data_ptr()), None, ctypes.c_int64(11), ctypes.c_int64(3))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(lib, True), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in proc.stderr and "csrc/kernels/cuda/linear_relu.cu" in proc.stderr, proc.stderr[-5000:]


def test_host_code_reading_device_memory_is_stopped():
    # In the race-detecting build the launchers run with device memory closed to the host: a
    # launcher reading a device pointer (a GPU would crash or read garbage) stops the process.
    lib = build.build("race")
    code = (f"import ctypes; lib = ctypes.CDLL({lib!r}); lib.emu_device_alloc.restype = ctypes.c_void_p; "
            "p = lib.emu_device_alloc(ctypes.c_size_t(64)); lib.emu_host_side(1); "
            "lib.emu_selftest_host_reads(ctypes.c_void_p(p))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(lib, False), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 70, proc.stderr[-3000:]
    assert "host code read or wrote device memory" in proc.stderr
