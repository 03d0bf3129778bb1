"""aiaas_fast.linear_relu against plain PyTorch: F.relu(F.linear(x, weight, bias))."""
import pytest
import torch
import torch.nn.functional as F

from aiaas_fast.ops import linear_relu
from helpers import DTYPES, assert_close, rand

# (leading dims of x, in_features, out_features): odd sizes, several leading dims, empty batch.
SHAPES = [
    ((3,), 17, 129),
    ((2, 5), 3, 1),
    ((129,), 129, 17),
    ((1,), 1, 3),
    ((4, 3, 2), 17, 17),
    ((0,), 17, 3),
    ((), 5, 4),
    ((300,), 64, 130),  # several row blocks for the bias-gradient reduction
]


def reference_forward(x, w, b):
    return F.relu(F.linear(x.double(), w.double(), None if b is None else b.double()))


def reference_backward(g, x, w, out, has_bias):
    """Gradients in float64, with the mask taken from the op's own output (so a value that
    rounds to zero differently in low precision cannot flip the comparison)."""
    gm = g.double() * (out > 0).double()
    gm2 = gm.reshape(-1, w.shape[0])
    grad_x = (gm2 @ w.double()).reshape(x.shape)
    grad_w = gm2.t() @ x.double().reshape(-1, w.shape[1])
    grad_b = gm2.sum(0) if has_bias else None
    return grad_x, grad_w, grad_b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,in_f,out_f", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_forward_backward_match_pytorch(backend, dtype, lead, in_f, out_f, bias, contiguous):
    dev = backend.device
    x = rand(*lead, in_f, dtype=dtype, contiguous=contiguous, requires_grad=True, device=dev)
    w = rand(out_f, in_f, dtype=dtype, contiguous=contiguous, requires_grad=True, scale=in_f**-0.5, device=dev)
    b = rand(out_f, dtype=dtype, contiguous=contiguous, requires_grad=True, device=dev) if bias else None
    if not backend.supports(dtype):
        with pytest.raises(RuntimeError, match=rf"aiaas_fast.linear_relu \({backend.name} backend\): supports .*got x.dtype={dtype}"):
            linear_relu(x, w, b)
        return
    out = linear_relu(x, w, b)
    assert out.shape == (*lead, out_f) and out.dtype == dtype and out.device == x.device
    assert_close(out, reference_forward(x, w, b), dtype, backend=backend)

    g = rand(*out.shape, dtype=dtype, device=dev)
    out.backward(g)
    ref_x, ref_w, ref_b = reference_backward(g, x.detach(), w.detach(), out.detach(), bias)
    assert_close(x.grad, ref_x, dtype, backend=backend)
    assert_close(w.grad, ref_w, dtype, backend=backend)
    if bias:
        assert_close(b.grad, ref_b, dtype, backend=backend)

    if dtype in (torch.float32, torch.float64) and out.numel() > 0:
        # Same-dtype eager PyTorch, gradients through autograd.
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        b2 = b.detach().clone().requires_grad_() if bias else None
        ref = F.relu(F.linear(x2, w2, b2))
        ref.backward(g)
        assert_close(out, ref, dtype, backend=backend)
        assert_close(x.grad, x2.grad, dtype, backend=backend)
        assert_close(w.grad, w2.grad, dtype, backend=backend)
        if bias:
            assert_close(b.grad, b2.grad, dtype, backend=backend)


def test_expanded_and_strided_bias_match_pytorch(backend):
    # A kernel that reads the bias with unit stride read past a stride-0 bias's one element
    # (the Triton forward did: garbage on the CPU, out of bounds on a GPU).
    dev = backend.device
    x, w = rand(7, 5, device=dev), rand(33, 5, device=dev)
    for b in (torch.full((1,), 0.25, device=dev).expand(33), rand(66, device=dev)[::2], rand(33, 2, device=dev)[:, 1]):
        assert_close(linear_relu(x, w, b), reference_forward(x, w, b), torch.float32, backend=backend)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_backward_computes_only_what_is_needed(backend, needs):
    x = rand(7, 5, requires_grad=needs[0], device=backend.device)
    w = rand(3, 5, requires_grad=needs[1], device=backend.device)
    b = rand(3, requires_grad=needs[2], device=backend.device)
    out = linear_relu(x, w, b)
    g = rand(7, 3, device=backend.device)
    out.backward(g)
    ref = reference_backward(g, x.detach(), w.detach(), out.detach(), True)
    for t, r, need in zip((x, w, b), ref, needs):
        if need:
            assert_close(t.grad, r, torch.float32, backend=backend)
        else:
            assert t.grad is None
    if backend.name != "native":
        return
    # The op itself returns None for gradients not asked for.
    gx, gw, gb = torch.ops.aiaas_fast.linear_relu_backward(g, x.detach(), w.detach(), out.detach(), list(needs))
    assert [t is not None for t in (gx, gw, gb)] == list(needs)


def test_gradcheck_float64(backend):
    if not backend.supports(torch.float64):
        pytest.skip("the Triton kernels take no float64; their gradients are compared with a float64 "
                    "reference in float32, bfloat16 and float16 by test_forward_backward_match_pytorch")
    x = rand(4, 3, 6, dtype=torch.float64, requires_grad=True, device=backend.device)
    w = rand(5, 6, dtype=torch.float64, requires_grad=True, device=backend.device)
    b = rand(5, dtype=torch.float64, requires_grad=True, device=backend.device)
    assert torch.autograd.gradcheck(linear_relu, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear_relu(x, w), (x, w))


def test_second_derivatives_match_pytorch(backend):
    # backward(create_graph=True), as a gradient penalty or a physics-informed loss needs:
    # the fused backward op has no derivative, so the op's backward must then record one.
    if backend.supports(torch.float64):
        x = rand(4, 3, 6, dtype=torch.float64, requires_grad=True, device=backend.device)
        w = rand(5, 6, dtype=torch.float64, requires_grad=True, device=backend.device)
        b = rand(5, dtype=torch.float64, requires_grad=True, device=backend.device)
        assert torch.autograd.gradgradcheck(linear_relu, (x, w, b))
    head = rand(1, 5, device=backend.device)

    def penalty(f, x, w, b):
        out = F.linear(f(x, w, b), head.to(x.dtype))
        gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + out.pow(2).sum(), (w, b))

    x = rand(7, 6, requires_grad=True, device=backend.device)
    w = rand(5, 6, requires_grad=True, device=backend.device)
    b = rand(5, requires_grad=True, device=backend.device)
    ours = penalty(linear_relu, x, w, b)
    ref = penalty(lambda x, w, b: F.relu(F.linear(x, w, b)), *(t.detach().double().requires_grad_() for t in (x, w, b)))
    assert ours[0].abs().sum() > 0  # the penalty's weight gradient is not zero
    for o, r in zip(ours, ref):
        assert_close(o, r, torch.float32, backend=backend)


def test_second_derivative_through_frozen_weights_is_zero_not_an_error(backend):
    # With frozen weights nothing but the mask links grad_x to x; torch's relu keeps that
    # (zero) link, so d(grad_x)/dx is zero. A mask taken by a comparison dropped it: an error.
    dev = backend.device
    w, b = rand(3, 2, device=dev), rand(3, device=dev)
    for f in (linear_relu, lambda x, w, b: F.relu(F.linear(x, w, b))):
        x = rand(4, 2, requires_grad=True, device=dev)
        gx, = torch.autograd.grad(f(x, w, b).sum(), x, create_graph=True)
        assert gx.requires_grad
        second, = torch.autograd.grad(gx.pow(2).sum(), x)
        assert torch.equal(second, torch.zeros_like(x))


def test_autocast_runs_the_op_in_its_dtype_as_linear(backend):
    # Under torch.autocast the op computes in the autocast dtype, as F.linear does; the float32
    # parameters get float32 gradients. A layer after an autocast nn.Linear (a bfloat16 x, a
    # float32 weight) was an error before.
    low = torch.bfloat16 if backend.device == "cpu" else torch.float16
    if not backend.supports(low):
        pytest.skip(f"{backend.name} takes no {low}")
    w = rand(5, 6, requires_grad=True, device=backend.device)
    b = rand(5, requires_grad=True, device=backend.device)
    x = rand(4, 6, device=backend.device)
    with torch.autocast(backend.device, dtype=low):
        ours = linear_relu(x, w, b)
        ref = F.relu(F.linear(x, w, b))
        after_linear = linear_relu(F.linear(x, rand(6, 6, device=backend.device)), w, b)
    assert ours.dtype == ref.dtype == after_linear.dtype == low
    assert_close(ours, ref, low, backend=backend)
    ours.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # The gradients of sum(out) through our own output's mask (an output that rounds to 0 in
    # one computation and not the other flips the mask: compare the backward, not rounding).
    mask = (ours > 0).double()
    assert_close(w.grad, mask.t() @ x.to(low).double(), low, backend=backend)
    assert_close(b.grad, mask.sum(0), low, backend=backend)
    with torch.autocast(backend.device, dtype=low, enabled=False):
        assert linear_relu(x, w, b).dtype == torch.float32

    def autocast_layer(x):
        with torch.autocast(backend.device, dtype=low):
            return linear_relu(x, w, b)

    if backend.name != "triton" or backend.device != "cpu":  # interpreted Triton ops are opaque to tracing
        compiled = torch.compile(autocast_layer, fullgraph=True)(x)
        assert compiled.dtype == low
        assert_close(compiled, autocast_layer(x), low, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    samples = [
        (rand(3, 17, dtype=dtype, requires_grad=True), rand(5, 17, dtype=dtype, requires_grad=True), rand(5, dtype=dtype, requires_grad=True)),
        (rand(2, 4, 3, dtype=dtype, contiguous=False), rand(1, 3, dtype=dtype), None),
        (rand(0, 4, dtype=dtype, requires_grad=True), rand(2, 4, dtype=dtype, requires_grad=True), rand(2, dtype=dtype)),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.aiaas_fast.linear_relu.default, args)
    x, w = rand(6, 4, dtype=dtype), rand(3, 4, dtype=dtype)
    out = linear_relu(x, w)
    torch.library.opcheck(
        torch.ops.aiaas_fast.linear_relu_backward.default, (rand(6, 3, dtype=dtype), x, w, out, [True, True, True])
    )


def test_nan_and_inf_propagate_as_pytorch(backend):
    x = rand(4, 6, device=backend.device)
    x[0, 1] = float("nan")
    x[2, 3] = float("inf")
    w, b = rand(5, 6, device=backend.device), rand(5, device=backend.device)
    assert_close(linear_relu(x, w, b), F.relu(F.linear(x, w, b)), torch.float32, backend=backend)
    assert torch.isnan(linear_relu(x, w, b)[0]).all()


def test_a_nan_output_passes_its_gradient_as_pytorch(backend):
    # relu's backward (threshold_backward) zeroes the gradient only where out <= 0: a NaN
    # output lets it through. The bias gradient shows the difference (x's NaN row aside).
    x = rand(4, 6, device=backend.device)
    x[0, 1] = float("nan")
    w = rand(5, 6, device=backend.device)
    b = rand(5, device=backend.device, requires_grad=True)
    g = rand(4, 5, device=backend.device)
    ours, = torch.autograd.grad(linear_relu(x, w, b), b, g)
    ref, = torch.autograd.grad(F.relu(F.linear(x, w, b)), b, g)
    assert_close(ours, ref, torch.float32, backend=backend)


def test_empty_batch_gives_empty_output_and_zero_weight_grads(backend):
    x = rand(0, 4, requires_grad=True, device=backend.device)
    w, b = rand(3, 4, requires_grad=True, device=backend.device), rand(3, requires_grad=True, device=backend.device)
    out = linear_relu(x, w, b)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("in_f,out_f", [(0, 3), (4, 0), (0, 0)])
def test_zero_features_match_pytorch(backend, in_f, out_f):
    # No input features: relu(bias) on every row, as F.linear gives; no outputs: empty.
    x = rand(5, in_f, requires_grad=True, device=backend.device)
    w, b = rand(out_f, in_f, requires_grad=True, device=backend.device), rand(out_f, requires_grad=True, device=backend.device)
    out = linear_relu(x, w, b)
    ref = F.relu(F.linear(x, w, b))
    assert out.shape == ref.shape == (5, out_f)
    assert_close(out, ref, torch.float32, backend=backend)
    out.sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref.sum().backward()
    for g, t in zip(grads, (x, w, b)):
        assert_close(g, t.grad, torch.float32, backend=backend)


def test_torch_func_transforms_match_pytorch():
    # Under torch.func the op runs as its PyTorch composition (functorch cannot transform a C++
    # autograd Function, and there is no batching rule): grad, vmap, jvp, jacrev, hessian.
    x, w, b = rand(4, 3, dtype=torch.float64), rand(5, 3, dtype=torch.float64), rand(5, dtype=torch.float64)
    ours = lambda x, w, b: linear_relu(x, w, b).square().sum()
    ref = lambda x, w, b: F.relu(F.linear(x, w, b)).square().sum()
    for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd, torch.func.hessian):
        torch.testing.assert_close(transform(ours, argnums=(0, 1, 2))(x, w, b), transform(ref, argnums=(0, 1, 2))(x, w, b))
    per_row = torch.func.vmap(torch.func.grad(ours, argnums=1), in_dims=(0, None, None))
    torch.testing.assert_close(per_row(x[:, None], w, b), torch.func.vmap(torch.func.grad(ref, argnums=1), in_dims=(0, None, None))(x[:, None], w, b))
    t = torch.ones_like(x)
    torch.testing.assert_close(torch.func.jvp(lambda x: linear_relu(x, w, b), (x,), (t,)),
                               torch.func.jvp(lambda x: F.relu(F.linear(x, w, b)), (x,), (t,)))


def test_forward_mode_ad_outside_torch_func_is_refused_not_dropped():
    # No jvp formula: a clear error, never a zero tangent.
    import torch.autograd.forward_ad as fwAD

    x, w = rand(4, 3, dtype=torch.float64), rand(5, 3, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD .* not supported"):
        linear_relu(fwAD.make_dual(x, torch.ones_like(x)), w)


def test_second_derivative_path_passes_nan_as_the_first():
    # backward(create_graph=True) takes another code path; a NaN output passes its gradient
    # there too, as threshold_backward does.
    x = torch.tensor([[float("nan"), 1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    plain, = torch.autograd.grad(linear_relu(x, w, b).sum(), b)
    graph, = torch.autograd.grad(linear_relu(x, w, b).sum(), b, create_graph=True)
    ref, = torch.autograd.grad(F.relu(F.linear(x, w, b)).sum(), b)
    assert torch.equal(plain, ref) and torch.equal(graph.detach(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_forward_is_rounded_once_as_linear(dtype):
    # The bias joins the product's float32 accumulator (as F.linear's), so the output is
    # rounded once: the same bits as torch on the CPU. Rounding the product first and adding
    # the bias after rounded twice (a largest error of 0.034 against torch's 0.023 in float16).
    x, w, b = rand(512, 64), rand(128, 64) / 8, rand(128)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    assert torch.equal(torch.ops.aiaas_fast.linear_relu(x, w, b), F.relu(F.linear(x, w, b)))


def test_bias_gradient_is_deterministic_across_thread_counts():
    x, w = rand(5000, 33), rand(65, 33)
    g = rand(5000, 65)
    out = linear_relu(x, w)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.aiaas_fast.linear_relu_backward(g, x, w, out, [False, False, True])[2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


BAD_INPUTS = [
    # (x shape, weight shape, bias shape, message fragment)
    ((4, 5), (3, 6), None, "x has 5 features"),
    ((4, 5), (3, 5), (4,), "bias must have shape [3]"),
    ((4, 5), (15,), None, "weight must be 2-D"),
    ((), (3, 5), None, "0-dim"),
    ((4, 5), (3, 5), (3, 1), "bias must have shape [3]"),
]


@pytest.mark.parametrize("xs,ws,bs,message", BAD_INPUTS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "fake"])
def test_bad_shapes_give_clear_errors(backend, xs, ws, bs, message, compiled):
    x, w = torch.randn(xs, device=backend.device), torch.randn(ws, device=backend.device)
    b = torch.randn(bs, device=backend.device) if bs else None
    if compiled:  # the fake kernel refuses the same inputs while tracing
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            x, w = mode.from_tensor(x), mode.from_tensor(w)
            b = mode.from_tensor(b) if b is not None else None
            with pytest.raises(RuntimeError, match="aiaas_fast.linear_relu") as err:
                linear_relu(x, w, b)
    else:
        with pytest.raises(RuntimeError, match="aiaas_fast.linear_relu") as err:
            linear_relu(x, w, b)
    assert message in str(err.value)


def test_dtype_and_device_mismatch_are_named():
    x, w = torch.randn(4, 5), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"x and weight must have the same dtype.*float"):
        linear_relu(x, w)
    with pytest.raises(RuntimeError, match=r"x and bias must have the same dtype"):
        linear_relu(x, w.float(), torch.randn(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"supports float32, float64, bfloat16 and float16"):
        linear_relu(torch.ones(4, 5, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"same device"):
        linear_relu(x, torch.randn(3, 5, device="meta"))


def test_module_like_use_under_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    dev = backend.device
    x, w, b = rand(8, 6, device=dev), rand(4, 6, requires_grad=True, device=dev), rand(4, requires_grad=True, device=dev)

    def f(x, w, b):
        return linear_relu(x, w, b).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b)
    loss.backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    ref = f(x, w, b)
    ref.backward()
    assert_close(loss, ref, torch.float32, backend=backend)
    assert_close(gw, w.grad, torch.float32, backend=backend)
    assert_close(gb, b.grad, torch.float32, backend=backend)


def test_flop_counter_counts_what_plain_pytorch_counts(backend):
    # FlopCounterMode (and tools on it) sees the fused op as the product it is.
    from torch.utils.flop_counter import FlopCounterMode

    def count(f):
        x = rand(6, 2, 7, device=backend.device, requires_grad=True)
        w = rand(5, 7, device=backend.device, requires_grad=True)
        b = rand(5, device=backend.device, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            f(x, w, b).sum().backward()
        return counter.get_total_flops()

    ours = count(linear_relu)
    assert ours == count(lambda x, w, b: F.relu(F.linear(x, w, b))) == 3 * 2 * 12 * 7 * 5


def test_bias_gradient_sum_is_as_accurate_as_torchs(backend):
    # Thousands of rows into one column: a float32 running sum drifted by hundreds of ulps
    # (rel. 2.6e-4 here), where torch's cascade sum stays within a few.
    dev, rows = backend.device, 32768
    x = rand(rows, 4, device=dev)
    w = rand(1, 4, device=dev).abs()
    b = torch.full((1,), 100.0, requires_grad=True, device=dev)  # every output > 0: all rows count
    g = torch.full((rows, 1), 0.1, device=dev)
    linear_relu(x, w, b).backward(g)
    exact = g.double().sum()
    torch_err = (g.sum(0).double() - exact).abs() / exact
    assert ((b.grad.double() - exact).abs() / exact).item() <= max(4 * torch_err.item(), 1e-6)
