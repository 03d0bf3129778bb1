"""The package as built: build_info, the registered ops, the CMake package, the ABI guard."""
import os
import subprocess
import sys

import pytest
import torch

import aiaas_fast


def test_build_info_describes_this_build():
    info = aiaas_fast.build_info()
    assert info["version"] == aiaas_fast.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] == (torch.version.cuda is not None and bool(info["cuda_archs"]))
    assert isinstance(info["cuda_archs"], list)
    assert isinstance(info["cutlass"], bool) and (info["cuda"] or not info["cutlass"])
    assert aiaas_fast._C.cuda_gemm_counts() == {} or info["cuda"]  # no CUDA forward has run on a CPU build
    assert isinstance(info["openmp"], bool) and info["parallel_backend"]
    assert info["compiler"] and info["build_type"]
    assert "default" in info["cpu_isas"] and info["cpu_isa"] in info["cpu_isas"]


def test_ops_are_registered_with_torch():
    for name in ("linear_relu", "linear_relu_backward", "mse_loss", "adam_"):
        op = getattr(torch.ops.aiaas_fast, name)
        assert op.default._schema.name == f"aiaas_fast::{name}"


def test_cmake_package_is_installed():
    root = os.path.join(aiaas_fast.cmake_prefix_path, "aiaas_fast")
    for f in ("aiaas_fastConfig.cmake", "aiaas_fastConfigVersion.cmake", "aiaas_fastTargets.cmake"):
        assert os.path.isfile(os.path.join(root, f)), f
    pkg = os.path.dirname(aiaas_fast.__file__)
    assert os.path.isfile(os.path.join(pkg, "include", "aiaas_fast", "aiaas_fast.h"))
    assert os.path.isfile(os.path.join(pkg, "include", "aiaas_fast", "build_config.h"))
    assert any(f.startswith("libaiaas_fast") for f in os.listdir(os.path.join(pkg, "lib")))


def test_a_different_torch_is_refused_with_a_message():
    code = "import torch; torch.__version__ = '0.0.1-other'; import aiaas_fast"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "was built against torch" in r.stderr and "0.0.1-other" in r.stderr and "Rebuild" in r.stderr


CHECK_ALL_OPS = """
import torch, torch.nn.functional as F, aiaas_fast
from aiaas_fast.ops import linear_relu, mse_loss, adam_
assert aiaas_fast.build_info()["cpu_isa"] == "{isa}", aiaas_fast.build_info()
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
    x, w, b = torch.randn(37, 19).to(dtype), torch.randn(67, 19).to(dtype), torch.randn(67).to(dtype)
    ref = F.relu(F.linear(x.double(), w.double(), b.double()))
    torch.testing.assert_close(linear_relu(x, w, b).double(), ref, rtol=tol, atol=tol)
    out = linear_relu(x, w, b)
    g = torch.randn_like(out)
    gm = g.double() * (out > 0).double()
    _, _, gb = torch.ops.aiaas_fast.linear_relu_backward(g, x, w, out, [False, False, True])
    torch.testing.assert_close(gb.double(), gm.sum(0), rtol=tol, atol=tol * 10)
    t = torch.randn(37, 67).to(dtype)
    torch.testing.assert_close(mse_loss(out, t).double(), F.mse_loss(out.double(), t.double()), rtol=tol, atol=tol)
    p, gr = torch.randn(1001).to(dtype), torch.randn(1001).to(dtype)
    q = p.double().clone().requires_grad_(); q.grad = gr.double()
    torch.optim.Adam([q], lr=0.01, amsgrad=True, weight_decay=0.1).step()
    adam_([p], [gr], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.tensor(0.)],
          lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.1, amsgrad=True)
    torch.testing.assert_close(p.double(), q.detach(), rtol=tol, atol=tol)
print("ok")
"""


def _cpu_supports(isa):
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    need = {"default": [], "avx2": ["avx2", "fma", "f16c"], "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}
    return all(f" {f}" in flags for f in need[isa])


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_compiled_cpu_kernel_set_is_correct(isa):
    if isa not in aiaas_fast.build_info()["cpu_isas"] or not _cpu_supports(isa):
        pytest.skip(f"{isa} kernels not built or not supported by this CPU")
    env = {**os.environ, "AIAAS_FAST_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", CHECK_ALL_OPS.format(isa=isa)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_unknown_cpu_isa_is_a_clear_error():
    env = {**os.environ, "AIAAS_FAST_CPU_ISA": "sse9"}
    code = "import aiaas_fast; aiaas_fast.build_info()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "AIAAS_FAST_CPU_ISA=sse9 is not one of default, avx2, avx512" in r.stderr


def test_one_openmp_runtime_and_threaded_kernels():
    # The ops are built with OpenMP (or at::parallel_for would run on one thread) and share
    # torch's libgomp: a second runtime would ignore torch.set_num_threads.
    from aiaas_fast.ops import mse_loss

    mse_loss(torch.randn(100_000), torch.randn(100_000))
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomps) <= 1, gomps
    if torch.backends.openmp.is_available():
        assert aiaas_fast.build_info()["openmp"] is True
