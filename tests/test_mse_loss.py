"""aiaas_fast.mse_loss against torch.nn.functional.mse_loss."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from aiaas_fast.ops import mse_loss
from helpers import DTYPES, assert_close, rand

# Broadcast shapes are tested on purpose here; the warning itself by test_warns_and_promotes_as_torch.
pytestmark = pytest.mark.filterwarnings("ignore:Using a target size")

REDUCTIONS = ["mean", "sum", "none"]
# (input shape, target shape): odd sizes, leading dims, empty, several reduction blocks, broadcasting.
SHAPES = [
    ((), ()),
    ((1,), (1,)),
    ((17,), (17,)),
    ((129, 3), (129, 3)),
    ((2, 3, 5), (2, 3, 5)),
    ((0,), (0,)),
    ((3, 0, 2), (3, 0, 2)),
    ((70001,), (70001,)),
    ((4, 1), (4, 3)),
    ((5,), (2, 5)),
]


def reference(input, target, reduction):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when input and target shapes differ
        return F.mse_loss(input, target, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_shape,tgt_shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_values_and_gradients_match_pytorch(backend, dtype, in_shape, tgt_shape, reduction, contiguous):
    x = rand(*in_shape, dtype=dtype, contiguous=contiguous, requires_grad=True, device=backend.device)
    t = rand(*tgt_shape, dtype=dtype, contiguous=contiguous, requires_grad=True, device=backend.device)
    if not backend.supports(dtype):
        with pytest.raises(RuntimeError, match=rf"aiaas_fast.mse_loss \({backend.name} backend\): supports .*got input.dtype={dtype}"):
            mse_loss(x, t, reduction)
        return
    loss = mse_loss(x, t, reduction)
    # The reference in float64 from the same rounded inputs, and eager PyTorch in the same dtype.
    x64, t64 = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = reference(x64, t64, reduction)
    assert loss.shape == ref.shape and loss.dtype == dtype
    assert_close(loss, ref, dtype)
    if dtype == torch.float32:
        assert_close(loss, reference(x.detach(), t.detach(), reduction), dtype)

    g = rand(*loss.shape, dtype=dtype, device=backend.device)
    loss.backward(g)
    ref.backward(g.double())
    # A mean's gradient 2 (x - t) g / n falls below the 16-bit tolerances at large n (a kernel
    # writing zeros would pass): compare it times n.
    k = torch.broadcast_shapes(x.shape, t.shape).numel() if reduction == "mean" else 1
    assert_close(x.grad * k, x64.grad * k, dtype, scaled_by=k)
    assert_close(t.grad * k, t64.grad * k, dtype, scaled_by=k)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, reduction):
    if not backend.supports(torch.float64):
        pytest.skip("the Triton kernels take no float64; their gradients are compared with a float64 "
                    "reference in float32, bfloat16 and float16 by test_values_and_gradients_match_pytorch")
    x = rand(3, 7, dtype=torch.float64, requires_grad=True, device=backend.device)
    t = rand(3, 7, dtype=torch.float64, requires_grad=True, device=backend.device)
    assert torch.autograd.gradcheck(lambda a, b: mse_loss(a, b, reduction), (x, t))
    tb = rand(7, dtype=torch.float64, requires_grad=True, device=backend.device)  # broadcast target
    assert torch.autograd.gradcheck(lambda a, b: mse_loss(a, b, reduction), (x, tb))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_derivatives_match_pytorch(backend, reduction):
    # backward(create_graph=True): the gradient must itself have a derivative.
    if backend.supports(torch.float64):
        x = rand(3, 5, dtype=torch.float64, requires_grad=True, device=backend.device)
        t = rand(3, 5, dtype=torch.float64, requires_grad=True, device=backend.device)
        assert torch.autograd.gradgradcheck(lambda a, b: mse_loss(a, b, reduction), (x, t))
    w = rand(4, 3, requires_grad=True, device=backend.device)
    x = rand(6, 3, requires_grad=True, device=backend.device)
    t = rand(6, 4, device=backend.device)

    def penalty(f, w, x):
        loss = f(x @ w.t(), t).sum()
        gx, = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w)[0]

    ours = penalty(lambda a, b: mse_loss(a, b, reduction), w, x)
    ref = penalty(lambda a, b: F.mse_loss(a, b.double(), reduction=reduction),
                  w.detach().double().requires_grad_(), x.detach().double().requires_grad_())
    assert ours.abs().sum() > 0
    assert_close(ours, ref, torch.float32, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    for reduction in REDUCTIONS:
        for compute_grad in (True, False):
            args = (rand(5, 3, dtype=dtype, requires_grad=True), rand(5, 3, dtype=dtype), reduction, compute_grad)
            torch.library.opcheck(torch.ops.aiaas_fast.mse_loss.default, args)
    torch.library.opcheck(torch.ops.aiaas_fast.mse_loss.default, (rand(4, 1, dtype=dtype), rand(4, 6, dtype=dtype, contiguous=False), "mean", True))


def test_forward_writes_the_gradient_only_when_asked():
    x, t = rand(6, 2), rand(6, 2)
    loss, grad = torch.ops.aiaas_fast.mse_loss(x, t, "sum", True)
    assert_close(grad, 2 * (x - t), torch.float32)
    loss2, grad2 = torch.ops.aiaas_fast.mse_loss(x, t, "sum", False)
    assert grad2 is None and torch.equal(loss, loss2)
    with torch.no_grad():  # the wrapper does not pay for a gradient nobody needs
        assert_close(mse_loss(x.requires_grad_(), t), F.mse_loss(x, t), torch.float32)


def test_op_returns_the_gradient_for_grad_output_one():
    x, t = rand(6, 2), rand(6, 2)
    for reduction, scale in (("mean", 2 / 12), ("sum", 2.0), ("none", 2.0)):
        _, grad = torch.ops.aiaas_fast.mse_loss(x, t, reduction, True)
        assert_close(grad, scale * (x - t), torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_and_repeated_backward_stay_correct(backend, reduction):
    # The saved gradient may be handed to autograd as is: it must survive a second backward.
    x, t = rand(5, 4, requires_grad=True, device=backend.device), rand(5, 4, device=backend.device)
    loss = mse_loss(x, t, reduction)
    g = torch.ones_like(loss)
    loss.backward(g, retain_graph=True)
    first = x.grad.clone()
    loss.backward(g)
    assert_close(x.grad, 2 * first, torch.float32)
    x64 = x.detach().double().requires_grad_()
    reference(x64, t.double(), reduction).backward(g.double())
    assert_close(first, x64.grad, torch.float32, backend=backend)


def test_gradient_flowing_into_a_shared_input_is_summed():
    w, t1, t2 = rand(3, requires_grad=True), rand(3), rand(3)
    y = w * 2
    (mse_loss(y, t1) + mse_loss(y, t2)).backward()
    w64 = w.detach().double().requires_grad_()
    y64 = w64 * 2
    (F.mse_loss(y64, t1.double()) + F.mse_loss(y64, t2.double())).backward()
    assert_close(w.grad, w64.grad, torch.float32)


def test_gradient_recomputed_when_the_forward_skipped_it():
    x, t = rand(4, 3, requires_grad=True), rand(4, 3)
    loss, _ = torch.ops.aiaas_fast.mse_loss(x, t, "mean", False)
    loss.backward()
    assert_close(x.grad, 2 * (x.detach() - t) / x.numel(), torch.float32)


def test_float16_gradient_survives_loss_scaling(backend):
    # The saved tensor is 2 (x - t), not 2 (x - t) / N: a large N would push it below
    # float16's range before a GradScaler-style scale could bring it back.
    n = 1 << 20
    x = (torch.rand(n) * 1e-2).half().to(backend.device).requires_grad_()
    t = torch.zeros(n, dtype=torch.float16, device=backend.device)
    (mse_loss(x, t) * 32768.0).backward()  # float16 max is 65504
    expected = 2 * x.detach().double() / n * 32768.0
    torch.testing.assert_close(x.grad.double(), expected, rtol=2e-3, atol=1e-6)


def test_nan_and_inf_propagate_as_pytorch(backend):
    x, t = rand(10, device=backend.device), rand(10, device=backend.device)
    x[3] = float("nan")
    t[5] = float("inf")
    for reduction in REDUCTIONS:
        assert_close(mse_loss(x, t, reduction), F.mse_loss(x, t, reduction=reduction), torch.float32, backend=backend)


def test_warns_and_promotes_as_torch(backend):
    # A target of another size warns as F.mse_loss does; mixed dtypes (a float64 target from
    # NumPy, integer labels) compute in the promoted dtype as F.mse_loss does.
    x = rand(4, 1, requires_grad=True, device=backend.device)
    with pytest.warns(UserWarning, match=r"Using a target size \(torch.Size\(\[4\]\)\) that is different to the input size"):
        mse_loss(x, rand(4, device=backend.device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mse_loss(x, rand(4, 1, device=backend.device))  # same size: no warning
    for t in (rand(4, 1, dtype=torch.float64, device=backend.device), torch.arange(4, device=backend.device)[:, None],
              rand(dtype=torch.float64, device=backend.device)):  # 0-dim: promoted in full, as F.mse_loss does
        if not backend.supports(torch.promote_types(x.dtype, t.dtype)):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 0-dim target's size warning
            ours = mse_loss(x, t)
            assert ours.dtype == F.mse_loss(x.detach(), t).dtype
            # torch 2.11's F.mse_loss has no backward for mixed dtypes: the reference casts first
            ref = F.mse_loss(x.to(ours.dtype), t.to(ours.dtype))
        torch.testing.assert_close(ours, ref)
        g, = torch.autograd.grad(ours, x)
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, torch.autograd.grad(ref, x)[0])


def test_forward_mode_ad_and_torch_func_and_a_broadcast_target_compiles():
    import torch.autograd.forward_ad as fwAD

    x, t = rand(4, 3, dtype=torch.float64), rand(4, 3, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD .* not supported"):
        mse_loss(fwAD.make_dual(x, torch.ones_like(x)), t)  # no jvp formula: refused, not a zero tangent
    for transform in (torch.func.grad, torch.func.jacfwd, torch.func.hessian):  # torch.func: the composition
        torch.testing.assert_close(transform(lambda a: mse_loss(a, t))(x), transform(lambda a: F.mse_loss(a, t))(x))
    torch.testing.assert_close(torch.func.vmap(lambda a, b: mse_loss(a, b, "sum"))(x, t), ((x - t) ** 2).sum(1))
    # The size warning is not issued while compiling (Dynamo cannot trace it): fullgraph holds.
    f = torch.compile(lambda a, b: mse_loss(a, b), fullgraph=True)
    a, t = rand(5, 1), rand(3)
    assert_close(f(a, t), F.mse_loss(a, t.expand(5, 3)), torch.float32)


def test_empty_input_reductions(backend):
    x, t = torch.empty(0, device=backend.device), torch.empty(0, device=backend.device)
    assert torch.isnan(mse_loss(x, t, "mean"))  # as torch: mean of nothing
    assert mse_loss(x, t, "sum").item() == 0.0
    assert mse_loss(x, t, "none").shape == (0,)


def test_loss_bits_do_not_depend_on_thread_count():
    x, t = rand(1_000_003), rand(1_000_003)
    threads = torch.get_num_threads()
    try:
        losses = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            losses.append(mse_loss(x, t))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(losses[0], l) for l in losses[1:])
    assert torch.equal(mse_loss(x, t), mse_loss(x, t))


def test_bad_inputs_give_clear_errors():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"aiaas_fast.mse_loss: input and target shapes are incompatible: input \[4, 3\], target \[4, 2\]"):
        mse_loss(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        mse_loss(x, x, "avg")  # a ValueError, as F.mse_loss's
    with pytest.raises(ValueError, match=r"reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        torch.ops.aiaas_fast.mse_loss(x, x, "avg")
    with pytest.raises(RuntimeError, match=r"input and target must have the same dtype.*torch.float32.*torch.float64"):
        torch.ops.aiaas_fast.mse_loss(x, x.double())  # the operator; the wrapper promotes, as F.mse_loss
    with pytest.raises(RuntimeError, match=r"supports float32, float64, bfloat16 and float16"):
        mse_loss(x.long(), x.long())
    with pytest.raises(RuntimeError, match=r"same device"):
        mse_loss(x, torch.randn(4, 3, device="meta"))


def test_loss_bits_are_the_same_on_every_run(backend):
    # No float atomics in any backend: the same inputs give the same bits, loss and gradient.
    n = 300_001 if backend.device == "cpu" else 5_000_003
    x = rand(n, device=backend.device, requires_grad=True)
    t = rand(n, device=backend.device)
    runs = []
    for _ in range(3):
        x.grad = None
        loss = mse_loss(x, t)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
    assert all(torch.equal(runs[0][0], l) and torch.equal(runs[0][1], g) for l, g in runs[1:])


def _op_of(backend):
    if backend.name == "triton":
        import aiaas_fast.triton  # noqa: F401  (registers the triton_* operators)
    ops = {"native": torch.ops.aiaas_fast.mse_loss, "triton": getattr(torch.ops.aiaas_fast, "triton_mse_loss", None)}
    if ops.get(backend.name) is None:
        pytest.skip(f"the {backend.name} backend has no mse_loss operator of its own")
    return ops[backend.name]


def test_grad_output_one_hands_on_the_saved_gradient(backend):
    # loss.backward(): the gradient the forward wrote is x.grad itself, no pass and no copy.
    # On a GPU only for large gradients (reading grad_output is a sync: it pays above 8M
    # elements); smaller ones are scaled, as is any other grad_output.
    op = _op_of(backend)
    n = 1 << 23 if backend.device == "cuda" else 1000
    x = torch.randn(n, device=backend.device, requires_grad=True)
    t = torch.randn(n, device=backend.device)
    loss, grad = op.default(x, t, "mean", True)
    ptr = grad.data_ptr()
    del grad  # held here, AccumulateGrad would have to copy it
    loss.backward()
    assert x.grad.data_ptr() == ptr
    assert_close(x.grad, 2 * (x.detach() - t) / n, torch.float32)
    x.grad = None
    op.default(x, t, "mean", True)[0].backward(torch.tensor(3.0, device=backend.device))
    assert_close(x.grad, 6 * (x.detach() - t) / n, torch.float32)
    if backend.device == "cuda":  # below the size, no read: a pass
        small = x.detach()[:1000].clone().requires_grad_()
        loss, grad = op.default(small, t[:1000], "mean", True)
        ptr = grad.data_ptr()
        del grad
        loss.backward()
        assert small.grad.data_ptr() != ptr


def test_graph_capture_of_a_large_backward_reads_nothing(backend):
    # Inside CUDA graph capture grad_output may not be read (a sync would break the capture).
    if backend.device != "cuda":
        pytest.skip("CUDA graph capture needs a GPU")
    op = _op_of(backend)
    n = 1 << 23
    x = torch.randn(n, device="cuda", requires_grad=True)
    t = torch.randn(n, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = None
            op.default(x, t, "mean", True)[0].backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        op.default(x, t, "mean", True)[0].backward()
    with torch.no_grad():
        x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(x.grad, 2 * (x.detach() - t) / n, torch.float32)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_float32_as_torch(backend, low):
    # mse_loss is on autocast's float32 list: two 16-bit inputs (an autocast model's output
    # and a target made under autocast) compute in float32, as F.mse_loss does; in float16
    # a loss above 65504 was inf.
    if not backend.supports(torch.float32):
        pytest.skip(f"{backend.name} takes no float32")
    dev = backend.device
    x = (rand(64, 3, device=dev) * 300).to(low).requires_grad_()
    t = rand(64, 3, device=dev).to(low)
    with torch.autocast(dev, dtype=low):
        for reduction in REDUCTIONS:
            ours, ref = mse_loss(x, t, reduction), F.mse_loss(x, t, reduction=reduction)
            assert ours.dtype == ref.dtype == torch.float32, (ours.dtype, ref.dtype)
            assert torch.isfinite(ours).all()
            assert_close(ours, ref, torch.float32, backend=backend)
        g_ours, = torch.autograd.grad(mse_loss(x, t), x)
        g_ref, = torch.autograd.grad(F.mse_loss(x, t), x)
    assert g_ours.dtype == g_ref.dtype == low
    assert_close(g_ours, g_ref, low, backend=backend)
    with torch.autocast(dev, dtype=low, enabled=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the interpreter warns of the float16 overflow)
        assert mse_loss(x, t).dtype == low


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_elements_and_gradient_are_rounded_once(dtype):
    # The CPU kernel computes in float32 and rounds each stored value once, to nearest even:
    # the same bits as rounding the float32 result with torch's own conversion. (Ties are
    # common: a difference of two 16-bit values has few significant bits, so its square often
    # ends exactly halfway between two 16-bit neighbours.)
    x, t = rand(4099, dtype=dtype, requires_grad=True), rand(4099, dtype=dtype)
    d = x.detach().float() - t.float()
    assert torch.equal(torch.ops.aiaas_fast.mse_loss(x.detach(), t, "none", False)[0], (d * d).to(dtype))
    mse_loss(x, t, "sum").backward()
    assert torch.equal(x.grad, (2 * d).to(dtype))


def test_loss_sum_is_as_accurate_as_torchs(backend):
    # A float32 running sum per vector lane over a 32768-element block drifted (rel. 1.6e-5).
    dev = backend.device
    for x in (torch.full((32768,), 1.1, device=dev), rand(100_003, device=dev) * 3 + 1):
        t = torch.zeros_like(x)
        exact = F.mse_loss(x.double(), t.double())
        torch_err = ((F.mse_loss(x, t).double() - exact).abs() / exact).item()
        assert ((mse_loss(x, t).double() - exact).abs() / exact).item() <= max(4 * torch_err, 1e-6)
