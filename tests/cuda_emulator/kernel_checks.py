"""The CUDA kernels of csrc/kernels/cuda that need no tensor cores (bias_relu, relu_grad,
mse_loss, adam: their launchers, grids, vector paths, shared-memory and warp reductions,
the Adam table's flushes) run on the CPU through the emulator of runtime.h, against plain
PyTorch. Element-wise results are compared bit for bit (they round once, as torch does);
sums and Adam within the CPU tests' tolerances.

Run by tests/test_cuda_kernels_emulated.py, in a process with AddressSanitizer preloaded,
so a read or write outside a buffer fails the run. By hand:

    LIB=$(python tests/cuda_emulator/build_kernels.py)
    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        AIAAS_FAST_EMULATED_KERNELS=$LIB python -m pytest tests/cuda_emulator/kernel_checks.py
"""
import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import DTYPES, assert_close, rand  # noqa: E402

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
WD_CODE = {"none": 0, "l2": 1, "decoupled": 2}
P = ctypes.c_void_p
I64 = ctypes.c_int64


class EmulatedKernels:
    """The launchers of kernels.cuh, called on CPU tensors; a launch error raises with the
    emulator's reason."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        lib.emu_failure.restype = ctypes.c_char_p
        lib.emu_bias_relu.argtypes = [ctypes.c_int, P, P, I64, I64]
        lib.emu_relu_grad_workspace_bytes.argtypes = [ctypes.c_int, I64, I64]
        lib.emu_relu_grad_workspace_bytes.restype = ctypes.c_size_t
        lib.emu_relu_grad.argtypes = [ctypes.c_int, P, P, P, P, P, I64, I64]
        lib.emu_mse_loss_workspace_bytes.argtypes = [I64]
        lib.emu_mse_loss_workspace_bytes.restype = ctypes.c_size_t
        lib.emu_mse_loss.argtypes = [ctypes.c_int, P, P, P, P, P, ctypes.c_double, ctypes.c_int, I64]
        pp = ctypes.POINTER(P)
        lib.emu_adam.argtypes = ([ctypes.c_int, ctypes.c_int, I64] + [pp] * 5 + [ctypes.POINTER(I64), pp, pp,
                                 ctypes.POINTER(ctypes.c_double)] + [ctypes.c_double] * 5 + [ctypes.c_int] * 3)
        lib.emu_device_alloc.restype = P
        lib.emu_device_alloc.argtypes = [ctypes.c_size_t]
        lib.emu_device_free.argtypes = [P]
        lib.emu_host_side.argtypes = [ctypes.c_int]
        self.lib = lib
        self.device_memory = self.race_detecting
        self.adam_max_tensors = lib.emu_adam_max_tensors()
        self.adam_max_blocks = lib.emu_adam_max_blocks()

    @property
    def race_detecting(self):
        return bool(self.lib.emu_selftest_race_detecting())

    def _check(self, code, what):
        if code != 0:
            raise RuntimeError(f"{what}: cudaError {code}: {self.failure()}")

    def failure(self):
        """The emulator's reason for the last error, with the kernel's source line where it
        gives a library offset (its kernels have internal linkage: no symbol names)."""
        text = self.lib.emu_failure().decode()
        m = re.search(r"(\S+\.so)\+(0x[0-9a-f]+)", text)
        if m and shutil.which("addr2line"):
            line = subprocess.run(["addr2line", "-f", "-C", "-e", m.group(1), m.group(2)], capture_output=True,
                                  text=True, check=False).stdout.split("\n")
            if len(line) >= 2:
                text += f" = {line[0]} at {line[1]}"
        return text

    def _args(self):
        return DeviceArgs(self.lib) if self.device_memory else HostArgs()

    def bias_relu(self, out, bias):
        rows, cols = out.shape
        a = self._args()
        self._check(a.call(self.lib.emu_bias_relu, DTYPE_CODE[out.dtype], a.ptr(out), a.ptr(bias), rows, cols),
                    "bias_relu")

    def relu_grad(self, g, out, gm, grad_bias):
        rows, cols = g.shape
        ws = workspace(self.lib.emu_relu_grad_workspace_bytes(DTYPE_CODE[g.dtype], rows, cols))
        a = self._args()
        self._check(a.call(self.lib.emu_relu_grad, DTYPE_CODE[g.dtype], a.ptr(g), a.ptr(out), a.ptr(gm),
                           a.ptr(grad_bias), a.ptr(ws), rows, cols), "relu_grad")

    def mse_loss(self, x, t, grad, loss, grad_scale, reduction):
        n = x.numel()
        ws = workspace(self.lib.emu_mse_loss_workspace_bytes(n))
        a = self._args()
        self._check(a.call(self.lib.emu_mse_loss, DTYPE_CODE[x.dtype], a.ptr(x), a.ptr(t), a.ptr(grad), a.ptr(loss),
                           a.ptr(ws), grad_scale, REDUCTION_CODE[reduction], n), "mse_loss")

    def adam(self, params, grads, m, v, vmax, steps, *, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False,
             amsgrad=False, maximize=False):
        """steps: per tensor, a 0-dim float32/float64 tensor (a device step the kernel
        increments) or a float (a host step, already incremented)."""
        count = len(params)
        a = self._args()
        arr = lambda ts: (P * max(count, 1))(*[a.ptr(t) for t in ts])  # noqa: E731
        f32 = [a.ptr(s) if torch.is_tensor(s) and s.dtype == torch.float32 else None for s in steps]
        f64 = [a.ptr(s) if torch.is_tensor(s) and s.dtype == torch.float64 else None for s in steps]
        host = [0.0 if torch.is_tensor(s) else float(s) for s in steps]
        mode = "none" if weight_decay == 0 else "decoupled" if decoupled else "l2"
        state_dtype = m[0].dtype if m else params[0].dtype
        self._check(a.call(
            self.lib.emu_adam,
            DTYPE_CODE[params[0].dtype], DTYPE_CODE[state_dtype], count, arr(params), arr(grads), arr(m), arr(v),
            arr(vmax if amsgrad else [None] * count), (I64 * max(count, 1))(*[p.numel() for p in params]),
            (P * max(count, 1))(*f32), (P * max(count, 1))(*f64), (ctypes.c_double * max(count, 1))(*host),
            lr, beta1, beta2, weight_decay, eps, WD_CODE[mode], int(amsgrad), int(maximize)), "adam")


class HostArgs:
    """The tensors' own memory (the AddressSanitizer build: its redzones guard the buffers)."""

    def ptr(self, t):
        return None if t is None else t.data_ptr()

    def call(self, fn, *args):
        return fn(*args)


class DeviceArgs(HostArgs):
    """The race-detecting build: each tensor copied into emulated device memory (at the same
    offset from 16 bytes, so alignment is kept; one copy per tensor, so a shared step stays
    shared), which host code cannot touch while the launcher runs: a launcher reading a
    device pointer on the host segfaults, as on a GPU. Copied back after the call."""

    def __init__(self, lib):
        self.lib, self.copies = lib, {}

    def ptr(self, t):
        if t is None or t.numel() == 0:
            return super().ptr(t)
        key = t.data_ptr()
        if key not in self.copies:
            n = t.numel() * t.element_size()
            base = self.lib.emu_device_alloc(n + 16)
            dev = base + key % 16
            ctypes.memmove(dev, key, n)
            self.copies[key] = (dev, n, base)
        return self.copies[key][0]

    def call(self, fn, *args):
        self.lib.emu_host_side(1)
        try:
            return fn(*args)
        finally:
            self.lib.emu_host_side(0)
            for key, (dev, n, base) in self.copies.items():
                ctypes.memmove(key, dev, n)
                self.lib.emu_device_free(base)


def workspace(nbytes):
    # Exactly the bytes asked for, so a kernel writing past them is caught by the sanitizer.
    return torch.empty(nbytes, dtype=torch.uint8)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def misaligned(t):
    """The same values one element into a fresh buffer: no longer 16-byte aligned, so the
    kernels take their element-by-element paths."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.numel() == 0 or view.data_ptr() % 16 != 0
    return view


@pytest.fixture(scope="module")
def cuda():
    path = os.environ.get("AIAAS_FAST_EMULATED_KERNELS")
    if not path:
        from build_kernels import build

        path = build("asan" if "libasan" in os.environ.get("LD_PRELOAD", "") else "race")
    return EmulatedKernels(path)


# ------------------------------------------------------------------ the emulator itself
def test_emulator_barrier_orders_shared_memory_in_every_block(cuda):
    blocks, threads = 3, 96
    out = torch.full((blocks * threads,), -1, dtype=torch.int32)
    assert cuda.lib.emu_selftest_mirror(P(out.data_ptr()), blocks, threads) == 0
    expected = torch.tensor([threads - 1 - t + 1000 * b for b in range(blocks) for t in range(threads)], dtype=torch.int32)
    exact(out, expected)


@pytest.mark.parametrize("delta", [1, 5, 16, 31])
def test_emulator_shuffle_down_is_the_hardwares(cuda, delta):
    # lane i gets lane i + delta's value within its warp, its own past the warp's end
    threads = 64
    x = torch.arange(threads, dtype=torch.float32) * 1.5
    out = torch.empty(threads)
    assert cuda.lib.emu_selftest_shuffle_down(P(x.data_ptr()), P(out.data_ptr()), threads, delta) == 0
    lane = torch.arange(threads) % 32
    expected = torch.where(lane + delta < 32, x[(torch.arange(threads) + delta).clamp(max=threads - 1)], x)
    exact(out, expected)


def test_race_detector_reports_what_races_on_a_gpu(cuda):
    # Only the race-detecting build (build_kernels.py race) sees memory accesses.
    if not cuda.race_detecting:
        pytest.skip("the AddressSanitizer build: races are checked by the race-detecting build")
    counter = torch.zeros(1, dtype=torch.int32)
    assert cuda.lib.emu_selftest_unsynchronized_increment(P(counter.data_ptr()), 32) == 719
    assert "data race" in cuda.failure() and "global memory" in cuda.failure()
    out = torch.zeros(64, dtype=torch.int32)
    assert cuda.lib.emu_selftest_read_unwritten_shared(P(out.data_ptr())) == 719
    assert "__shared__ memory no thread of this block has written" in cuda.failure()
    assert "selftest.cu" in cuda.failure() or not shutil.which("addr2line")
    assert cuda.lib.emu_selftest_write_after_read(P(out.data_ptr())) == 719
    # in thread order the read comes first: "a write after a read" (reversed: "a read of a write")
    assert re.search("a write after a read|a read of a write", cuda.failure()) and "thread 0" in cuda.failure()
    assert cuda.lib.emu_selftest_blocks_write_one_place(P(out.data_ptr()), 3) == 719
    assert len(set(re.findall(r"block (\d+) thread", cuda.failure()))) == 2, cuda.failure()  # two blocks named
    # one thread, one block: nothing to race with
    assert cuda.lib.emu_selftest_unsynchronized_increment(P(counter.data_ptr()), 1) == 0
    assert cuda.lib.emu_selftest_blocks_write_one_place(P(out.data_ptr()), 1) == 0


def test_emulator_reports_what_a_gpu_leaves_undefined(cuda):
    out = torch.zeros(64, dtype=torch.int32)
    assert cuda.lib.emu_selftest_return_before_barrier(P(out.data_ptr())) == 719  # cudaErrorLaunchFailure
    assert "__syncthreads" in cuda.lib.emu_failure().decode()
    # a shuffle over a partial warp with the full mask
    x, y = torch.zeros(48), torch.zeros(48)
    assert cuda.lib.emu_selftest_shuffle_down(P(x.data_ptr()), P(y.data_ptr()), 48, 1) == 719
    assert "mask" in cuda.lib.emu_failure().decode()
    # more threads per block than any GPU has
    assert cuda.lib.emu_selftest_mirror(P(out.data_ptr()), 1, 2048) == 9  # cudaErrorInvalidConfiguration
    assert "block (2048, 1, 1)" in cuda.lib.emu_failure().decode()
    assert cuda.lib.emu_selftest_mirror(P(out.data_ptr()), 0, 32) == 9


@pytest.mark.parametrize("schedule", ["reverse", "random:1", "random:2"])
def test_results_do_not_depend_on_the_order_threads_run_in(cuda, monkeypatch, schedule):
    # The emulator resumes a block's threads by index unless told otherwise; a kernel missing
    # a barrier is right in one order only. Every kernel's results, bits included, must be
    # those of the default order.
    def run_all():
        torch.manual_seed(3)
        g, out = rand(513, 33), rand(513, 33)
        gm, gb = torch.empty(513, 33), torch.empty(33)
        cuda.relu_grad(g, out, gm, gb)
        x, t = rand(70_001, dtype=torch.bfloat16), rand(70_001, dtype=torch.bfloat16)
        grad, loss = run_mse(cuda, x, t, "mean")
        params, *_ = run_adam(cuda, torch.float32, FLAGS[-1], shapes=[(3, 5), (70_001,), (1,)], steps=2,
                              step_kind="device-f32")
        mirror = torch.empty(96, dtype=torch.int32)
        assert cuda.lib.emu_selftest_mirror(P(mirror.data_ptr()), 1, 96) == 0
        return [gm, gb, grad, loss, mirror, *params]

    expected = run_all()
    monkeypatch.setenv("AIAAS_FAST_EMULATOR_SCHEDULE", schedule)
    for a, b in zip(run_all(), expected):
        exact(a, b)


def test_a_bad_schedule_is_named(cuda, monkeypatch):
    monkeypatch.setenv("AIAAS_FAST_EMULATOR_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="AIAAS_FAST_EMULATOR_SCHEDULE.*sideways"):
        cuda.bias_relu(torch.zeros(2, 2), None)


# ------------------------------------------------------------------ linear_relu's element-wise kernels
SHAPES = [(1, 1), (37, 19), (300, 70), (513, 33), (0, 7), (5, 0)]
# relu_grad: rows whole 16-byte groups long (its vector path for every dtype), narrow ones
# (more row groups than column groups), and enough rows for several row tiles.
RELU_GRAD_SHAPES = SHAPES + [(70, 24), (130, 64), (1000, 8), (2100, 2), (3000, 16), (257, 264)]


def with_specials(t):
    """Exact zeros, a negative zero and a NaN among the values (the ReLU's edge cases)."""
    flat = t.view(-1)
    if flat.numel() >= 4:
        flat[0], flat[1], flat[2], flat[3] = 0.0, -0.0, float("nan"), -1e-30
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_relu_is_torchs_relu_of_the_sum_bit_for_bit(cuda, dtype, shape, with_bias):
    out = with_specials(rand(*shape, dtype=dtype))
    bias = rand(shape[1], dtype=dtype) if with_bias else None
    a = out.to(acc(dtype))
    expected = torch.relu(a + bias.to(acc(dtype)) if with_bias else a).to(dtype)
    cuda.bias_relu(out, bias)
    exact(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RELU_GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("outputs", ["both", "grad", "bias"])
def test_relu_grad_masks_like_threshold_backward_and_sums_the_bias_gradient(cuda, dtype, shape, outputs):
    g = rand(*shape, dtype=dtype)
    out = with_specials(rand(*shape, dtype=dtype))
    masked = torch.ops.aten.threshold_backward(g, out, 0)  # torch's ReLU backward: NaN outputs pass
    gm = torch.full(shape, 7.0, dtype=dtype) if outputs != "bias" else None
    grad_bias = torch.full(shape[1:], 7.0, dtype=dtype) if outputs != "grad" else None
    cuda.relu_grad(g, out, gm, grad_bias)
    if gm is not None:
        exact(gm, masked)
    if grad_bias is not None:
        assert_close(grad_bias, masked.double().sum(0), dtype)
        if dtype != torch.float64:  # summed in double: within one rounding of the float64 sum
            torch.testing.assert_close(grad_bias.double(), masked.double().sum(0).to(dtype).double(),
                                       rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("which", ["g", "out", "gm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_grad_any_misaligned_pointer_takes_the_element_path_with_the_same_bits(cuda, dtype, which):
    # Each pointer off 16 bytes alone (UBSan stops a vector access to a misaligned address):
    # the element path visits the same elements and adds in the same order as the vector one.
    shape = (1500, 32)
    g, out = rand(*shape, dtype=dtype), with_specials(rand(*shape, dtype=dtype))
    results = []
    for off in (False, True):
        place = (lambda name, v: misaligned(v) if off and name == which else v)  # noqa: E731
        gm, grad_bias = place("gm", torch.zeros(shape, dtype=dtype)), torch.zeros(shape[1], dtype=dtype)
        cuda.relu_grad(place("g", g), place("out", out), gm, grad_bias)
        results.append((gm, grad_bias))
    exact(results[1][0], results[0][0])
    exact(results[1][1], results[0][1])
    exact(results[0][0], torch.ops.aten.threshold_backward(g, out, 0))


def test_relu_grad_bias_sum_is_accurate_over_many_rows(cuda):
    # 20000 equal rows: a float32 running sum drifts by hundreds of ulps; the kernel's is within one.
    rows, cols = 20000, 3
    g = torch.full((rows, cols), 0.1, dtype=torch.float32)
    out = torch.ones(rows, cols)
    grad_bias = torch.empty(cols)
    cuda.relu_grad(g, out, None, grad_bias)
    exact(grad_bias, g.double().sum(0).float())


# ------------------------------------------------------------------ mse_loss
MSE_SIZES = [0, 1, 7, 8, 9, 255, 1000, 70_001]


def mse_reference(x, t, reduction):
    a = acc(x.dtype)
    d = x.to(a) - t.to(a)
    scale = torch.tensor(2.0 / x.numel() if reduction == "mean" and x.numel() else 2.0, dtype=torch.float64).to(a)
    grad = (d * scale).to(x.dtype)
    sq = d * d
    if reduction == "none":
        return grad, sq.to(x.dtype)
    total = sq.double().sum()
    return grad, (total / x.numel() if reduction == "mean" else total)


def run_mse(cuda, x, t, reduction, want_grad=True):
    grad = torch.full_like(x, 7.0) if want_grad else None
    loss = torch.full_like(x, 7.0) if reduction == "none" else torch.full((), 7.0, dtype=x.dtype)
    n = x.numel()
    cuda.mse_loss(x, t, grad, loss, 2.0 / n if reduction == "mean" and n else 2.0, reduction)
    return grad, loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", MSE_SIZES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_mse_loss_matches_torch(cuda, dtype, n, reduction, aligned):
    x, t = rand(n, dtype=dtype), rand(n, dtype=dtype)
    if not aligned:
        x = misaligned(x)
    grad, loss = run_mse(cuda, x, t, reduction)
    want_grad, want_loss = mse_reference(x, t, reduction)
    exact(grad, want_grad)  # each element rounded once, as torch's
    if reduction == "none":
        exact(loss, want_loss)
    else:
        if n == 0:
            assert (loss.isnan() if reduction == "mean" else loss == 0).item(), loss
            return
        # partial sums in the accumulation type, then double: a few ulps of the exact sum
        torch.testing.assert_close(loss.double(), want_loss.to(dtype).double(), rtol=4 * torch.finfo(dtype).eps, atol=0)
        assert_close(loss, F.mse_loss(x.double(), t.double(), reduction=reduction), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_without_the_gradient(cuda, reduction):
    x, t = rand(1000), rand(1000)
    _, loss = run_mse(cuda, x, t, reduction, want_grad=False)
    assert_close(loss, F.mse_loss(x.double(), t.double(), reduction=reduction), torch.float32)


@pytest.mark.parametrize("which", ["input", "target", "grad", "loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mse_loss_any_misaligned_pointer_takes_the_element_path(cuda, dtype, which):
    # Each pointer off 16 bytes alone: the element path (UBSan stops a vector access to a
    # misaligned address), with the same values as the aligned call.
    n = 1001
    x, t = rand(n, dtype=dtype), rand(n, dtype=dtype)
    outputs = {}
    for off in (False, True):
        place = (lambda name, v: misaligned(v) if off and name == which else v)  # noqa: E731
        grad, loss = place("grad", torch.zeros(n, dtype=dtype)), place("loss", torch.zeros(n, dtype=dtype))
        cuda.mse_loss(place("input", x), place("target", t), grad, loss, 2.0, "none")
        outputs[off] = (grad, loss)
    exact(outputs[True][0], outputs[False][0])
    exact(outputs[True][1], outputs[False][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_loss_same_bits_misaligned_and_aligned(cuda, dtype):
    # The vector and the element-by-element paths add in the same order.
    x, t = rand(300_003, dtype=dtype), rand(300_003, dtype=dtype)
    _, aligned_loss = run_mse(cuda, x, t, "sum")
    _, misaligned_loss = run_mse(cuda, misaligned(x), misaligned(t), "sum")
    exact(misaligned_loss, aligned_loss)


# ------------------------------------------------------------------ Adam
FLAGS = [dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled=d)
         for a, m, wd, d in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
         if not (wd == 0.0 and d)]
ADAM_SHAPES = [(20, 10), (20,), (1,), (), (0,), (3, 17), (4099,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def flag_id(f):
    return "-".join(f"{k}={v}" for k, v in f.items())


def run_adam(cuda, dtype, flags, *, state_dtype=None, shapes=ADAM_SHAPES, steps=3, step_kind="host",
             misalign=(), shared_step=False, grad_scale=1.0, shrink=1.0, hyper=HYPER):
    """Our kernel and a float64 torch.optim.Adam(W) on the same start and gradients.
    misalign: which of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq to place off 16 bytes."""
    state_dtype = state_dtype or dtype
    place = lambda name, ts: [misaligned(t) for t in ts] if name in misalign else ts  # noqa: E731
    params = place("param", [rand(*s, dtype=dtype) for s in shapes])
    ref = [p.detach().double().clone().requires_grad_() for p in params]
    opt_cls = torch.optim.AdamW if flags["decoupled"] else torch.optim.Adam
    ref_opt = opt_cls(ref, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                      weight_decay=flags["weight_decay"], amsgrad=flags["amsgrad"], maximize=flags["maximize"],
                      foreach=False)
    zeros = lambda name: place(name, [torch.zeros(p.shape, dtype=state_dtype) for p in params])  # noqa: E731
    m, v, vmax = zeros("exp_avg"), zeros("exp_avg_sq"), zeros("max_exp_avg_sq")
    if step_kind == "host":
        counters = [0.0] * len(params)
    else:
        one = torch.zeros((), dtype=torch.float32 if step_kind == "device-f32" else torch.float64)
        counters = [one] * len(params) if shared_step else [one.clone() for _ in params]
    for step in range(steps):
        grads = place("grad", [rand(*s, dtype=dtype, scale=grad_scale * shrink**step) for s in shapes])
        for q, g in zip(ref, grads):
            q.grad = g.double()
        if step_kind == "host":
            counters = [c + 1 for c in counters]
        cuda.adam(params, grads, m, v, vmax, counters, **hyper, **flags)
        ref_opt.step()
    return params, ref, counters, (m, v, vmax)


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("step_kind", ["host", "device-f32", "device-f64"])
def test_adam_every_flag_float32(cuda, flags, step_kind):
    ours, ref, counters, _ = run_adam(cuda, torch.float32, flags, step_kind=step_kind)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)
    if step_kind != "host":
        assert all(c.item() == 3 for c in counters)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["plain", "all-flags"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_adam_matches_torch(cuda, dtype, flags):
    ours, ref, _, _ = run_adam(cuda, dtype, flags)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adam_float32_state_for_16_bit_params(cuda, dtype):
    ours, ref, _, (m, _, _) = run_adam(cuda, dtype, FLAGS[-1], state_dtype=torch.float32)
    assert all(s.dtype == torch.float32 for s in m)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), dtype)


@pytest.mark.parametrize("misalign", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_a_misaligned_tensor_takes_the_element_path_with_the_same_result(cuda, dtype, misalign):
    # Any one pointer off 16 bytes sends its tensor down the element path (UBSan stops a
    # vector access to a misaligned address), with the vector path's bits.
    flags = FLAGS[-1]  # amsgrad: max_exp_avg_sq in use
    state = torch.float32 if dtype == torch.bfloat16 else None
    torch.manual_seed(1)
    aligned = run_adam(cuda, dtype, flags, state_dtype=state)
    torch.manual_seed(1)
    unaligned = run_adam(cuda, dtype, flags, state_dtype=state, misalign=(misalign,))
    for a, b in zip(aligned[0] + list(itertools.chain(*aligned[3])), unaligned[0] + list(itertools.chain(*unaligned[3]))):
        exact(b, a)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_small_and_shrinking_gradients(cuda, amsgrad):
    # Gradients of 1e-6 shrinking tenfold each step: eps is a tenth of sqrt(v) and more, and
    # with beta2 = 0.5 v halves each step, so amsgrad's running maximum stays well above it:
    # both change the update visibly.
    flags = dict(amsgrad=amsgrad, maximize=False, weight_decay=0.0, decoupled=False)
    ours, ref, _, _ = run_adam(cuda, torch.float32, flags, grad_scale=1e-6, shrink=0.1, steps=4,
                               hyper=dict(HYPER, beta2=0.5))
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["plain", "all-flags"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adam_16_bit_params_match_the_cpu_op_within_one_rounding(cuda, dtype, flags):
    # The float64 reference's tolerance for 16-bit params (3e-2) is as large as three steps'
    # movement; the CPU op does the same arithmetic and rounds the same way: within an ulp.
    from aiaas_fast.ops import adam_

    shapes = [(20, 10), (4099,), ()]
    params = [rand(*s, dtype=dtype) for s in shapes]
    cpu = [p.clone() for p in params]
    state = lambda: [torch.zeros(p.shape, dtype=dtype) for p in params]  # noqa: E731 (the CPU op's: the params')
    ours_state, cpu_state = (state(), state(), state()), (state(), state(), state())
    cpu_steps = [torch.zeros(()) for _ in params]
    for step in range(3):
        grads = [rand(*s, dtype=dtype) for s in shapes]
        cuda.adam(params, grads, *ours_state, [step + 1.0] * len(params), **HYPER, **flags)
        adam_(cpu, grads, cpu_state[0], cpu_state[1], cpu_state[2] if flags["amsgrad"] else [], cpu_steps,
              lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
              weight_decay=flags["weight_decay"], amsgrad=flags["amsgrad"], maximize=flags["maximize"],
              decoupled_weight_decay=flags["decoupled"])
    for a, b in zip(params, cpu):
        torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 1e-3)


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=str)
def test_adam_a_step_shared_across_launches_is_read_after_every_increment(cuda, step_dtype):
    # One step tensor for more params than one launch's table holds: it counts once per
    # param, and every param's update reads the final count, as the CPU op (which adds to
    # every step, then updates) does; not a count that depends on the launch a param fell in.
    from aiaas_fast.ops import adam_

    shapes = [(3, 2)] * (cuda.adam_max_tensors + 7)
    params = [rand(*s) for s in shapes]
    cpu = [p.clone() for p in params]
    ours_state = ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
    cpu_state = ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
    step, cpu_step = torch.zeros((), dtype=step_dtype), torch.zeros(())
    for _ in range(2):
        grads = [rand(*s) for s in shapes]
        cuda.adam(params, grads, *ours_state, [], [step] * len(shapes), **HYPER)
        adam_(cpu, grads, *cpu_state, [], [cpu_step] * len(shapes), lr=HYPER["lr"], beta1=HYPER["beta1"],
              beta2=HYPER["beta2"], eps=HYPER["eps"], weight_decay=0.0, amsgrad=False, maximize=False)
    assert step.item() == cpu_step.item() == 2 * len(shapes)
    for a, b in zip(params, cpu):
        assert_close(a, b, torch.float32)


def test_relu_grad_tiles_a_grid_taller_than_65535_blocks(cuda, monkeypatch):
    # Past 65535 x 256 rows the row tiles must grow, or the grid's y would be out of range.
    # Checked as a dry run (each launch's configuration checked, nothing run: 16.8M rows
    # would take long).
    rows = 65535 * 256 + 1
    g = torch.empty(rows, 1)
    monkeypatch.setenv("AIAAS_FAST_EMULATOR_DRY_RUN", "1")
    cuda.relu_grad(g, g, None, torch.empty(1))
    with pytest.raises(RuntimeError, match="launch configuration out of range"):  # still checked
        cuda._check(cuda.lib.emu_selftest_mirror(P(0), 1, 4096), "mirror")


def test_adam_more_tensors_than_one_table(cuda):
    # more tensors than one launch's table holds, zero-size ones among them (each still
    # takes a slot: its device step counts)
    shapes = [(i % 7 + 1, 3) for i in range(cuda.adam_max_tensors + 9)] + [(0,)] * 3
    ours, ref, counters, _ = run_adam(cuda, torch.float32, FLAGS[-1], shapes=shapes, step_kind="device-f32")
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)
    assert [c.item() for c in counters] == [3.0] * len(shapes)


def test_adam_tensor_longer_than_one_launch(cuda):
    # more chunks of 65536 than one table's blocks: the tensor continues in a second launch,
    # its device step incremented once
    n = cuda.adam_max_blocks * 65536 + 1001
    ours, ref, counters, _ = run_adam(cuda, torch.float32, FLAGS[0], shapes=[(5,), (n,), (3,)], steps=2,
                                      step_kind="device-f64")
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)
    assert [c.item() for c in counters] == [2.0, 2.0, 2.0]


def test_adam_shared_device_step_counts_once_per_param(cuda):
    # As torch's multi-tensor Adam and our CPU op: a step tensor shared by two params counts twice.
    ours, _, counters, _ = run_adam(cuda, torch.float32, FLAGS[0], shapes=[(6, 5), (7,)], steps=1,
                                    step_kind="device-f32", shared_step=True)
    assert counters[0] is counters[1] and counters[0].item() == 2.0
