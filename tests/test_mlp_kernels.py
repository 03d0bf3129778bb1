"""The training engine's small-width CPU kernels (csrc/kernels/cpu/mlp.cpp) at every vector
width, on any x86-64 CPU: the source is compiled here into small libraries, one per width
(4 floats: the baseline; 8: AVX2; 16: the AVX-512 copy's code, built with
AIAAS_FAST_MLP_VW=16 on AVX2 instructions where the CPU has no AVX-512, and natively where
it has), and each kernel is compared with PyTorch on odd sizes. test_engine.py runs the
whole engine on the copy this CPU selects; without this file a machine without AVX-512
would never run the widest copy's code."""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "kernels", "cpu", "mlp.cpp")
ALIGN = 16  # kBatchAlign: the batch rows' length is a multiple of it

SHIM = r"""
#include "kernels/cpu/mlp.h"
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
extern "C" const aiaas_fast::cpu::MlpKernels* mlp_kernels() {
  return &aiaas_fast::cpu::CAT(isa_, AIAAS_FAST_ISA)::mlp_kernels();
}
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _variants():
    """(id, AIAAS_FAST_ISA, compiler flags) for each width this CPU can run."""
    out = [("vw4", "default", [])]
    flags = _cpu_flags()
    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86 and {"avx2", "fma"} <= flags:
        out.append(("vw8-avx2", "avx2", ["-mavx2", "-mfma", "-mf16c"]))
        out.append(("vw16-on-avx2", "avx512", ["-mavx2", "-mfma", "-mf16c", "-DAIAAS_FAST_MLP_VW=16"]))
    if x86 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        out.append(("vw16-avx512", "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                    "-mprefer-vector-width=512"]))
    return out


def _compiler():
    cxx = os.environ.get("CXX", "")
    return shutil.which(cxx.split()[0]) if cxx else (shutil.which("g++") or shutil.which("c++"))


_BUILT = {}


def _build(isa, flags):
    """The kernels of mlp.cpp for (isa, flags) as a shared library, cached by source and flags."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    digest = hashlib.sha256(" ".join([isa] + flags).encode())
    for path in (SOURCE, os.path.join(ROOT, "csrc", "kernels", "cpu", "mlp.h")):
        with open(path, "rb") as f:
            digest.update(f.read())
    key = digest.hexdigest()[:16]
    if key in _BUILT:
        return _BUILT[key]
    out_dir = tempfile.mkdtemp(prefix="aiaas_fast_mlp_kernels_")
    shim = os.path.join(out_dir, "shim.cpp")
    with open(shim, "w") as f:
        f.write(SHIM)
    lib = os.path.join(out_dir, f"mlp_{key}.so")
    # The library build's flags (cmake/CpuKernels.cmake), so the code is the one that ships.
    cmd = [cxx, "-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared",
           f"-DAIAAS_FAST_ISA={isa}", f"-I{os.path.join(ROOT, 'csrc')}", *flags, SOURCE, shim, "-o", lib]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
    _BUILT[key] = lib
    return lib


i64, vp, b_ = ctypes.c_int64, ctypes.c_void_p, ctypes.c_bool


class MlpKernels(ctypes.Structure):
    # The order and signatures of struct MlpKernels in csrc/kernels/cpu/mlp.h.
    _fields_ = [
        ("dense_forward", ctypes.CFUNCTYPE(None, vp, vp, vp, vp, i64, i64, i64, i64, b_)),
        ("bias_act", ctypes.CFUNCTYPE(None, vp, vp, i64, i64, b_)),
        ("dense_grad_weight", ctypes.CFUNCTYPE(None, vp, vp, vp, vp, i64, i64, i64, b_)),
        ("dense_grad_input", ctypes.CFUNCTYPE(None, vp, vp, vp, vp, i64, i64, i64, i64)),
        ("relu_mask", ctypes.CFUNCTYPE(None, vp, vp, i64, i64)),
        ("row_sums", ctypes.CFUNCTYPE(None, vp, vp, i64, i64, b_)),
        ("mse_grad", ctypes.CFUNCTYPE(ctypes.c_double, vp, vp, vp, i64, i64, i64, ctypes.c_float)),
        ("gather_transpose", ctypes.CFUNCTYPE(None, vp, i64, vp, i64, i64, vp, i64)),
        ("transpose_out", ctypes.CFUNCTYPE(None, vp, i64, i64, i64, vp)),
    ]


@pytest.fixture(scope="module", params=_variants(), ids=lambda v: v[0])
def k(request):
    if not sys.platform.startswith("linux"):
        pytest.skip("builds with the Linux toolchain")
    _, isa, flags = request.param
    lib = ctypes.CDLL(_build(isa, flags))
    lib.mlp_kernels.restype = ctypes.POINTER(MlpKernels)
    kernels = lib.mlp_kernels().contents
    kernels._lib = lib  # keeps the library loaded while the struct is used
    return kernels


def P(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def feature_major(rows, batch, ld):
    """(rows, ld) float32, the batch's columns random, the padding past it zero (the layout)."""
    t = torch.zeros(rows, ld)
    t[:, :batch] = torch.randn(rows, batch)
    return t


def close(a, b):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=2e-5, atol=2e-5, equal_nan=True)


SHAPES = [(1, 1, 16), (3, 5, 16), (10, 20, 64), (20, 1, 64), (17, 9, 80), (13, 37, 48)]  # (in, out, ld)


@pytest.mark.parametrize("inf,outf,ld", SHAPES)
@pytest.mark.parametrize("bias,relu", [(True, True), (False, True), (True, False)])
def test_dense_forward(k, inf, outf, ld, bias, relu):
    w, b, a = torch.randn(outf, inf), torch.randn(outf) if bias else None, feature_major(inf, ld, ld)
    a[0, 0] = float("nan")  # NaN passes the ReLU, as torch.relu
    for cols in sorted({ALIGN, ld}):
        z = torch.full((outf, ld), 7.0)
        k.dense_forward(P(w), P(b), P(a), P(z), inf, outf, ld, cols, relu)
        ref = w.double() @ a.double() + (b.double()[:, None] if bias else 0)
        ref = torch.relu(ref) if relu else ref
        close(z[:, :cols], ref[:, :cols])
        assert (z[:, cols:] == 7.0).all(), "wrote past cols"


@pytest.mark.parametrize("rows,ld", [(1, 16), (5, 48), (20, 64)])
def test_bias_act_relu_mask_and_row_sums(k, rows, ld):
    z, b = torch.randn(rows, ld), torch.randn(rows)
    z[0, 1] = float("nan")
    out = z.clone()
    k.bias_act(P(out), P(b), rows, ld, True)
    close(out, torch.relu(z + b[:, None]))
    g, a = torch.randn(rows, ld), torch.randn(rows, ld)
    masked = g.clone()
    k.relu_mask(P(masked), P(a), rows, ld)
    assert torch.equal(masked, torch.where(a <= 0, 0.0, g))  # threshold_backward's rule
    db = torch.empty(rows)
    k.row_sums(P(g), P(db), rows, ld, False)
    close(db, g.double().sum(1))
    start = torch.randn(rows)
    db = start.clone()
    k.row_sums(P(g), P(db), rows, ld, True)  # a later chunk of the batch: added
    close(db, start.double() + g.double().sum(1))


@pytest.mark.parametrize("inf,outf,ld", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_grad_weight(k, inf, outf, ld, bias):
    g, a = feature_major(outf, ld - 3 if ld > 16 else ld, ld), feature_major(inf, ld, ld)
    dw, db = torch.full((outf, inf), 7.0), torch.full((outf,), 7.0) if bias else None
    k.dense_grad_weight(P(g), P(a), P(dw), P(db), inf, outf, ld, False)
    close(dw, g.double() @ a.double().T)
    if bias:
        close(db, g.double().sum(1))
    # add: a later chunk of a large batch adds its sums to the earlier chunks'
    dw0, db0 = torch.randn(outf, inf), torch.randn(outf) if bias else None
    dw, db = dw0.clone(), db0.clone() if bias else None
    k.dense_grad_weight(P(g), P(a), P(dw), P(db), inf, outf, ld, True)
    close(dw, dw0.double() + g.double() @ a.double().T)
    if bias:
        close(db, db0.double() + g.double().sum(1))


@pytest.mark.parametrize("inf,outf,ld", SHAPES)
@pytest.mark.parametrize("masked", [True, False])
def test_dense_grad_input(k, inf, outf, ld, masked):
    w, g = torch.randn(outf, inf), feature_major(outf, ld, ld)
    a_in = torch.randn(inf, ld) if masked else None
    for cols in sorted({ALIGN, ld}):
        ga = torch.full((inf, ld), 7.0)
        k.dense_grad_input(P(w), P(g), P(a_in), P(ga), inf, outf, ld, cols)
        ref = w.double().T @ g.double()
        if masked:
            ref = torch.where(a_in <= 0, 0.0, ref)
        close(ga[:, :cols], ref[:, :cols])
        assert (ga[:, cols:] == 7.0).all(), "wrote past cols"


@pytest.mark.parametrize("rows,batch,ld", [(1, 1, 16), (3, 13, 16), (1, 64, 64), (2, 37, 48)])
def test_mse_grad(k, rows, batch, ld):
    z, y = torch.randn(rows, ld), torch.randn(rows, ld)
    g = torch.full((rows, ld), 7.0)
    sse = k.mse_grad(P(z), P(y), P(g), rows, batch, ld, 0.25)
    d = (z - y)[:, :batch].double()
    assert sse == pytest.approx(float((d * d).sum()), rel=1e-5)
    close(g[:, :batch], d * 0.25)
    assert (g[:, batch:] == 0).all(), "padding must carry no gradient"


@pytest.mark.parametrize("cols", [1, 5, 8, 10, 16, 19])
@pytest.mark.parametrize("batch", [1, 7, 8, 13, 64])
@pytest.mark.parametrize("indexed", [False, True])
def test_gather_transpose_and_back(k, cols, batch, indexed):
    n, ldx = 70, cols + 3  # rows of x longer than the columns taken: a row stride of its own
    x = torch.randn(n, ldx)
    idx = torch.randint(0, n, (batch,), dtype=torch.int64) if indexed else None
    ld = (batch + ALIGN - 1) // ALIGN * ALIGN
    xt = torch.full((cols, ld), 7.0)
    k.gather_transpose(P(x), ldx, P(idx), batch, cols, P(xt), ld)
    rows = x[idx] if indexed else x[:batch]
    assert torch.equal(xt[:, :batch], rows[:, :cols].T)  # a copy: the same bits
    assert (xt[:, batch:] == 0).all(), "padding must be zero"
    back = torch.empty(batch, cols)
    k.transpose_out(P(xt), ld, batch, cols, P(back))
    assert torch.equal(back, rows[:, :cols])
