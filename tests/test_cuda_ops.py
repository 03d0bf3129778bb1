"""The CUDA kernels (csrc/kernels/cuda, registered under the aiaas_fast ops' CUDA key)
against plain PyTorch on the same GPU. Skipped without CUDA; run on the GPU machine by
scripts/gpu_check.sh. Tolerances are the CPU tests' (tests/helpers.py); float32 products
are true float32 (no TF32 unless torch.backends.cuda.matmul.allow_tf32 is set, which these
tests leave off), CUTLASS is used for bfloat16/float16 only."""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from aiaas_fast.ops import adam_, linear_relu, mse_loss
from helpers import DTYPES, assert_close, rand

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)
# A build without them would run these through the default backend (Triton) and blame the
# native kernels for its failures; gpu_check.sh reports such a build by itself.
import aiaas_fast  # noqa: E402

if not aiaas_fast.backend.native_supports("cuda"):
    pytest.skip("this build has no native CUDA kernels (aiaas_fast.build_info()['cuda'] is False)",
                allow_module_level=True)

DEV = "cuda"
pytestmark = pytest.mark.gpu
GEMMS = ["auto", "cutlass", "cublaslt", "mm"]


def cuda(*shape, dtype=torch.float32, contiguous=True, requires_grad=False, scale=1.0):
    t = rand(*shape, dtype=dtype, contiguous=True, scale=scale).to(DEV)
    if not contiguous and len(shape) > 0:
        big = torch.zeros(tuple(2 * s for s in shape), dtype=dtype, device=DEV)
        view = big[tuple(slice(None, None, 2) for _ in shape)]
        view.copy_(t)
        t = view
    return t.requires_grad_(requires_grad)


@pytest.fixture(params=GEMMS)
def gemm(request, monkeypatch):
    monkeypatch.setenv("AIAAS_FAST_CUDA_GEMM", request.param)
    return request.param


def ref_linear_relu(x, w, b):
    return F.relu(F.linear(x.double(), w.double(), None if b is None else b.double()))


# ------------------------------------------------------------------ linear_relu
# (rows, in, out): odd sizes (the CUTLASS kernel declines them: fallback), aligned sizes (it runs)
LINEAR_SHAPES = [(37, 19, 23), (64, 64, 128), (300, 256, 72), (1, 8, 8), (0, 16, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_relu_forward(gemm, dtype, shape, with_bias):
    rows, k, n = shape
    x, w = cuda(rows, k, dtype=dtype), cuda(n, k, dtype=dtype)
    b = cuda(n, dtype=dtype) if with_bias else None
    assert_close(linear_relu(x, w, b), ref_linear_relu(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_relu_batch_dims_and_strides(gemm, dtype):
    x = cuda(3, 5, 64, dtype=dtype, contiguous=False)
    w, b = cuda(32, 64, dtype=dtype, contiguous=False), cuda(32, dtype=dtype, contiguous=False)
    out = linear_relu(x, w, b)
    assert out.shape == (3, 5, 32)
    assert_close(out, ref_linear_relu(x, w, b), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_relu_one_row_with_a_row_stride_under_its_length(gemm, dtype):
    # A one-row view may carry any row stride (contiguous() keeps it), here 8 < 64: the GEMM
    # must not be given it as the leading dimension (TMA would refuse or misread it).
    x = cuda(64, dtype=dtype).as_strided((1, 64), (8, 1))
    w, b = cuda(16, 64, dtype=dtype), cuda(16, dtype=dtype)
    assert_close(linear_relu(x, w, b), ref_linear_relu(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 19, 23), (256, 64, 128), (3000, 32, 40)], ids=str)
def test_linear_relu_backward(dtype, shape):
    rows, k, n = shape
    x, w, b = (cuda(rows, k, dtype=dtype, requires_grad=True), cuda(n, k, dtype=dtype, requires_grad=True),
               cuda(n, dtype=dtype, requires_grad=True))
    g = cuda(rows, n, dtype=dtype)
    out = linear_relu(x, w, b)
    out.backward(g)
    # The reference takes the ReLU mask from the op's own output: a pre-activation within
    # rounding of 0 (1.4e-7 in the (3000, 32, 40) case) may fall on either side in another
    # summation order, which would flip a whole row of the comparison.
    xr, wr = x.detach().double(), w.detach().double()
    gm = g.double() * (out.detach() > 0)
    ref_gx, ref_gw, ref_gb = gm @ wr, gm.t() @ xr, gm.sum(0)
    # sums over rows (grad_w, grad_b) grow with the row count (and their rounding with the
    # order cuBLAS picks, split-K included): compare relative to it, float64 aside
    scale = 1.0 if dtype == torch.float64 else max(1.0, rows / 256)
    assert_close(x.grad, ref_gx, dtype)
    torch.testing.assert_close(w.grad.double() / scale, ref_gw / scale, **_tol(dtype))
    torch.testing.assert_close(b.grad.double() / scale, ref_gb / scale, **_tol(dtype))


def _tol(dtype):
    from helpers import tol
    return tol(dtype)


def test_linear_relu_gradcheck_float64():
    x = cuda(5, 7, dtype=torch.float64, requires_grad=True)
    w, b = cuda(4, 7, dtype=torch.float64, requires_grad=True), cuda(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_relu, (x, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_relu_opcheck(dtype):
    for args in [
        (cuda(3, 16, dtype=dtype, requires_grad=True), cuda(8, 16, dtype=dtype, requires_grad=True), cuda(8, dtype=dtype, requires_grad=True)),
        (cuda(2, 4, 3, dtype=dtype, contiguous=False), cuda(1, 3, dtype=dtype), None),
    ]:
        torch.library.opcheck(torch.ops.aiaas_fast.linear_relu.default, args)
    x, w = cuda(6, 4, dtype=dtype), cuda(3, 4, dtype=dtype)
    torch.library.opcheck(torch.ops.aiaas_fast.linear_relu_backward.default,
                          (cuda(6, 3, dtype=dtype), x, w, linear_relu(x, w), [True, True, True]))


@pytest.mark.parametrize("gemm_name", ["cutlass", "mm", "cublaslt", "auto"])
def test_linear_relu_nan_propagates(monkeypatch, gemm_name):
    monkeypatch.setenv("AIAAS_FAST_CUDA_GEMM", gemm_name)
    x, w, b = cuda(16, 64, dtype=torch.bfloat16), cuda(16, 64, dtype=torch.bfloat16), cuda(16, dtype=torch.bfloat16)
    x[0, 1] = float("nan")
    assert torch.isnan(linear_relu(x, w, b)[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_each_gemm_choice_runs_its_kernel(monkeypatch, dtype):
    # A choice falls back quietly where its kernel declines the shapes; the counts say which
    # product ran, so a kernel that always declines cannot pass as tested.
    import aiaas_fast

    info = aiaas_fast.build_info()
    hopper = torch.cuda.get_device_capability()[0] == 9 and "90a" in info["cuda_archs"]
    expect = {"cublaslt": "cublaslt", "mm": "mm"}
    if info["cutlass"]:
        expect["cutlass"] = "cutlass_sm90" if hopper else "cutlass_sm80"
    # aligned (CUTLASS takes it), several tiles, partial tiles in M and an odd tile count in N
    x, w, b = cuda(1000, 512, dtype=dtype), cuda(384, 512, dtype=dtype), cuda(384, dtype=dtype)
    for choice, kernel in expect.items():
        monkeypatch.setenv("AIAAS_FAST_CUDA_GEMM", choice)
        before = aiaas_fast._C.cuda_gemm_counts().get(kernel, 0)
        out = linear_relu(x, w, b)
        assert aiaas_fast._C.cuda_gemm_counts().get(kernel, 0) == before + 1, (choice, aiaas_fast._C.cuda_gemm_counts())
        assert_close(out, ref_linear_relu(x, w, b), dtype)


def test_bad_gemm_choice_is_named(monkeypatch):
    monkeypatch.setenv("AIAAS_FAST_CUDA_GEMM", "fastest")
    with pytest.raises(RuntimeError, match="AIAAS_FAST_CUDA_GEMM must be"):
        linear_relu(cuda(2, 8), cuda(8, 8), cuda(8))


# ------------------------------------------------------------------ mse_loss
MSE_SIZES = [0, 1, 7, 4096, 100_003, 3_000_000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", MSE_SIZES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_values_and_grad(dtype, n, reduction):
    x, t = cuda(n, dtype=dtype, requires_grad=True), cuda(n, dtype=dtype)
    loss = mse_loss(x, t, reduction)
    xr = x.detach().double().requires_grad_()
    ref = F.mse_loss(xr, t.double(), reduction=reduction)
    if reduction == "sum" and n and torch.isinf(ref.to(dtype)):
        assert torch.isinf(loss)  # past float16's range (65504): inf, as torch's own float16 mse_loss
    elif reduction == "sum" and n:
        torch.testing.assert_close(loss.double() / n, ref / n, **_tol(dtype), equal_nan=True)
    else:
        assert_close(loss, ref, dtype)
    if n:
        g = torch.ones_like(loss)
        loss.backward(g)
        ref.backward(g.double())
        k = n if reduction == "mean" else 1  # 2 (x - t) / n is below the tolerances: compare it times n
        assert_close(x.grad * k, xr.grad * k, dtype, scaled_by=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_loss_broadcast_misaligned_and_strided(dtype):
    x, t = cuda(33, 1, 17, dtype=dtype), cuda(5, 17, dtype=dtype)
    assert_close(mse_loss(x, t), F.mse_loss(*torch.broadcast_tensors(x.double(), t.double())), dtype)
    x, t = cuda(10_001, dtype=dtype)[1:], cuda(10_003, dtype=dtype)[3:]  # storage offsets: no 16-byte loads
    assert_close(mse_loss(x, t, "none"), F.mse_loss(x.double(), t.double(), reduction="none"), dtype)
    x, t = cuda(64, 48, dtype=dtype, contiguous=False), cuda(64, 48, dtype=dtype, contiguous=False)
    assert_close(mse_loss(x, t), F.mse_loss(x.double(), t.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_loss_same_bits_for_a_misaligned_view_and_an_aligned_copy(dtype):
    # Misaligned pointers take scalar loads instead of 16-byte vectors, over the same groups
    # of elements in the same order: the loss must not change by a bit.
    n = 300_007
    base_x, base_t = cuda(n + 1, dtype=dtype), cuda(n + 1, dtype=dtype)
    x, t = base_x[1:], base_t[1:]
    assert x.data_ptr() % 16 and t.data_ptr() % 16
    for reduction in ("sum", "mean"):
        assert torch.equal(mse_loss(x, t, reduction), mse_loss(x.clone(), t.clone(), reduction))


def test_mse_loss_opcheck():
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.aiaas_fast.mse_loss.default, (cuda(4, 5, dtype=dtype, requires_grad=True), cuda(4, 5, dtype=dtype), "mean", True))
        torch.library.opcheck(torch.ops.aiaas_fast.mse_loss.default, (cuda(4, 5, dtype=dtype), cuda(5, dtype=dtype), "none", False))


def test_mse_loss_gradcheck_float64():
    x, t = cuda(6, 5, dtype=torch.float64, requires_grad=True), cuda(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mse_loss(a, b), (x, t))


# ------------------------------------------------------------------ Adam
FLAGS = [
    dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled_weight_decay=d)
    for a, m, wd, d in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
    if not (wd == 0.0 and d)
]
SHAPES = [(20, 10), (20,), (1,), (), (0,), (3, 17), (70_001,)]


def run_adam(dtype, flags, state_dtype=None, steps=3, device_steps=False, shapes=SHAPES, contiguous=True):
    state_dtype = state_dtype or dtype
    start = [cuda(*s, dtype=dtype, contiguous=contiguous) for s in shapes]
    ref = [p.detach().double().clone().requires_grad_() for p in start]
    opt_ref = torch.optim.Adam(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False, **flags)
    m = [torch.zeros(p.shape, dtype=state_dtype, device=DEV) for p in start]
    v = [torch.zeros(p.shape, dtype=state_dtype, device=DEV) for p in start]
    vmax = [torch.zeros(p.shape, dtype=state_dtype, device=DEV) for p in start] if flags["amsgrad"] else []
    steps_t = [torch.tensor(0.0, device=DEV if device_steps else "cpu") for _ in start]
    for _ in range(steps):
        grads = [cuda(*s, dtype=dtype) for s in shapes]
        for q, g in zip(ref, grads):
            q.grad = g.double()
        adam_(start, grads, m, v, vmax, steps_t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, **flags)
        opt_ref.step()
    return start, ref, steps_t


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_adam_every_flag_float32(flags):
    ours, ref, steps = run_adam(torch.float32, flags)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)
    assert all(s.item() == 3 for s in steps)


# The CPU tests' flag sets for every dtype (tests/test_adam.py), same-dtype state.
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1], dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=False)],
                         ids=["plain", "all-flags", "amsgrad-l2"])
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float16], ids=str)
def test_adam_matches_torch(dtype, flags):
    ours, ref, steps = run_adam(dtype, flags)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), dtype)
    assert all(s.item() == 3 for s in steps)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["plain", "all-flags"])
def test_adam_float16_state_matches_the_cpu_kernel(flags):
    # float16 state underflows: a first gradient of 2e-3 gives v = 4e-9, below float16's
    # smallest subnormal, stored as 0 (a float64 torch.optim.Adam keeps it). So the oracle for
    # float16 state is the CPU kernel, which rounds the state the same way, not torch.
    cpu = [rand(*s, dtype=torch.float16) for s in SHAPES]
    gpu = [p.to(DEV) for p in cpu]
    state = {d: [[torch.zeros(p.shape, dtype=torch.float16, device=d) for p in cpu] for _ in range(3)] for d in ("cpu", DEV)}
    steps = {d: [torch.tensor(0.0) for _ in cpu] for d in ("cpu", DEV)}
    for _ in range(3):
        grads = [rand(*s, dtype=torch.float16) for s in SHAPES]
        for d, params, gs in (("cpu", cpu, grads), (DEV, gpu, [g.to(DEV) for g in grads])):
            m, v, vmax = state[d]
            adam_(params, gs, m, v, vmax if flags["amsgrad"] else [], steps[d], lr=1e-2, beta1=0.9, beta2=0.999,
                  eps=1e-8, **flags)
    for p, q in zip(gpu, cpu):
        assert_close(p.cpu(), q, torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adam_float32_state_for_16_bit_params(dtype):
    ours, ref, _ = run_adam(dtype, FLAGS[-1], state_dtype=torch.float32)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), dtype)


def test_adam_device_steps_non_contiguous_and_many_tensors():
    flags = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    shapes = [(i % 7 + 1, 3) for i in range(40)] + [(0,)]  # more tensors than one launch's table holds
    ours, ref, steps = run_adam(torch.float32, flags, device_steps=True, shapes=shapes, contiguous=False)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)
    assert all(s.device.type == "cuda" and s.item() == 3 for s in steps)


@pytest.mark.parametrize("count", [2, 40], ids=["one-launch", "two-launches"])
def test_adam_shared_device_step_counts_once_per_param_as_on_the_cpu(count):
    # Params sharing one step tensor: torch's multi-tensor Adam and the CPU op count it once
    # per param before any update, so every param sees the final count; the CUDA increments
    # are atomic and all run before the first update launch (40 params: two launches).
    ps = [cuda(6, 5) if i % 2 == 0 else cuda(7) for i in range(count)]
    gs = [cuda(*p.shape) for p in ps]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    results = []
    for dev in (DEV, "cpu"):
        p = [x.clone().to(dev) for x in ps]
        m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
        step = torch.zeros((), device=dev)
        adam_(p, [x.to(dev) for x in gs], m, v, [], [step] * count, **hyper)
        results.append((p, step.item()))
    (gpu, gpu_step), (cpu, cpu_step) = results
    assert gpu_step == cpu_step == count
    for a, b in zip(gpu, cpu):
        assert_close(a.cpu(), b, torch.float32)


@pytest.mark.slow
def test_adam_tensor_larger_than_one_launch():
    n = 320 * 65536 + 1001  # more chunks than one launch's table holds: continues in a second launch
    ours, ref, steps = run_adam(torch.float32, FLAGS[0], device_steps=True, shapes=[(n,), (5,)], steps=2)
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)
    assert [s.item() for s in steps] == [2, 2]


def test_adam_captured_in_a_cuda_graph():
    shapes = [(64, 32), (32,), (1000,)]
    params = [cuda(*s) for s in shapes]
    twin = [p.clone() for p in params]
    grads = [cuda(*s) for s in shapes]

    def state():
        return ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                [torch.zeros((), device=DEV) for _ in params])

    m, v, steps = state()
    m2, v2, steps2 = state()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    adam_(params, grads, m, v, [], steps, **hyper)  # warm-up outside the capture
    adam_(twin, grads, m2, v2, [], steps2, **hyper)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        adam_(params, grads, m, v, [], steps, **hyper)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        graph.replay()
        adam_(twin, grads, m2, v2, [], steps2, **hyper)
    torch.cuda.synchronize()
    assert [x.item() for x in steps] == [4.0] * 3 == [x.item() for x in steps2]
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


def test_adam_with_cpu_steps_refuses_graph_capture():
    # A CPU step enters the launch as a number; a captured graph would replay it frozen.
    p, g = [cuda(8)], [cuda(8)]
    m, v, steps = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])], [torch.tensor(0.0)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False)
    torch.ops.aiaas_fast.adam_.default(p, g, m, v, [], steps, **hyper)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="on the CPU while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            torch.ops.aiaas_fast.adam_.default(p, g, m, v, [], steps, **hyper)
    assert steps[0].item() == 1.0  # the refused call changed nothing


def test_adam_opcheck():
    p = [cuda(3, 4), cuda(5)]
    args = (p, [cuda(3, 4), cuda(5)], [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p], [],
            [torch.tensor(0.0, device=DEV), torch.tensor(0.0)])
    torch.library.opcheck(torch.ops.aiaas_fast.adam_.default, args,
                          dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                               maximize=False, decoupled_weight_decay=False))


def test_adam_bad_steps_are_named():
    p = [cuda(3)]
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        adam_(p, [cuda(3)], [cuda(3)], [cuda(3)], [], [torch.zeros((), dtype=torch.float16, device=DEV)],
              lr=1e-3, beta1=0.9, beta2=0.999)
    with pytest.raises(RuntimeError, match="float32"):
        adam_([cuda(3)], [cuda(3)], [cuda(3, dtype=torch.float64)], [cuda(3)], [], [torch.zeros(())],
              lr=1e-3, beta1=0.9, beta2=0.999)


# ------------------------------------------------------------------ every op: determinism, streams, devices
def _all_ops(device):
    torch.manual_seed(7)
    x = torch.randn(513, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(128, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(513, 128, device=device, dtype=torch.bfloat16)
    loss = mse_loss(linear_relu(x, w, b), t)
    loss.backward()
    p = [torch.randn(1000, device=device), torch.randn(70_001, device=device)]
    adam_(p, [torch.randn_like(q) for q in p], [torch.zeros_like(q) for q in p], [torch.zeros_like(q) for q in p],
          [], [torch.zeros((), device=device) for _ in p], lr=1e-2, beta1=0.9, beta2=0.999)
    return [loss, x.grad, w.grad, b.grad, *p]


def test_same_inputs_same_bits_twice():
    first, second = _all_ops(DEV), _all_ops(DEV)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_on_a_second_stream():
    expected = _all_ops(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _all_ops(DEV)
    s.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_on_a_second_gpu():
    expected = _all_ops("cuda:0")
    got = _all_ops("cuda:1")
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b.cpu())


def test_compiled_step_has_no_graph_break():
    x, w, b = cuda(32, 16, requires_grad=True), cuda(8, 16, requires_grad=True), cuda(8, requires_grad=True)
    t = cuda(32, 8)
    fn = torch.compile(lambda x: mse_loss(linear_relu(x, w, b), t), fullgraph=True)
    assert_close(fn(x), F.mse_loss(ref_linear_relu(x, w, b), t.double()), torch.float32)


def test_build_info_lists_the_cuda_archs():
    import aiaas_fast
    info = aiaas_fast.build_info()
    assert info["cuda"] and info["cuda_archs"], info
    assert os.environ.get("AIAAS_FAST_CUDA_ARCHS") or any(a.startswith("90") for a in info["cuda_archs"])
    # The Hopper GEMM is built wherever architecture 90 and CUTLASS are (recorded as "90a").
    if info["cutlass"] and "90" in [a.split("-")[0] for a in info["cuda_archs"]]:
        assert "90a" in info["cuda_archs"], info
