"""aiaas_fast.adam_ (one multi-tensor call per step) against torch.optim.Adam / AdamW."""
import itertools
import math

import pytest
import torch

from aiaas_fast.ops import adam_
from helpers import DTYPES, assert_close, rand

# An MLP's tensors plus the odd ones: a scalar, an empty tensor, one spanning several chunks.
SHAPES = [(20, 10), (20,), (1, 20), (1,), (), (0,), (3, 17), (40_001,)]

FLAGS = [
    dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled_weight_decay=d)
    for a, m, wd, d in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
    if not (wd == 0.0 and d)
]


class OurAdam:
    """The state torch.optim.Adam keeps, updated by one aiaas_fast.adam_ call per step."""

    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
        self.params = params
        self.hyper = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                          maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in params] if amsgrad else []
        self.steps = [torch.tensor(0.0) for _ in params]

    def step(self):
        adam_(self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
              self.steps, **self.hyper)


def run_both(dtype, flags, steps=4, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, shapes=SHAPES, contiguous=True, device="cpu"):
    """Runs our op and torch.optim.Adam in float64 (same rounded start and gradients) side by side."""
    start = [rand(*s, dtype=dtype, contiguous=contiguous, device=device) for s in shapes]
    ours = [p.clone() if contiguous else p for p in start]
    ref = [p.detach().double().cpu().clone().requires_grad_() for p in start]
    opt_ours = OurAdam(ours, lr, betas, eps, **flags)
    opt_ref = torch.optim.Adam(ref, lr=lr, betas=betas, eps=eps, **flags)
    for _ in range(steps):
        grads = [rand(*s, dtype=dtype, device=device) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad = g
            q.grad = g.double().cpu()
        opt_ours.step()
        opt_ref.step()
    return ours, ref, opt_ours, opt_ref


def step_with_torch(ours, flags, steps, device):
    """``steps`` steps of our op on ``ours`` and of float32 torch.optim.Adam on copies, with the
    same fresh gradients; returns (our optimizer state, torch's optimizer, torch's params)."""
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt_ours = OurAdam(ours, 1e-2, (0.9, 0.999), 1e-8, **flags)
    opt_ref = torch.optim.Adam(ref, lr=1e-2, **flags)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            p.grad = rand(*p.shape, device=device)
            q.grad = p.grad.clone()
        opt_ours.step()
        opt_ref.step()
    return opt_ours, opt_ref, ref


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_matches_torch_adam_float32_same_dtype(backend, flags):
    # Against torch.optim.Adam itself in float32: the same op-by-op math, so close to rounding.
    ours = [rand(*s, device=backend.device) for s in SHAPES]
    opt_ours, opt_ref, ref = step_with_torch(ours, flags, 5, backend.device)
    for i, (p, q) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6, msg=f"param {i} {tuple(p.shape)}")
        st = opt_ref.state[q]
        torch.testing.assert_close(opt_ours.exp_avgs[i], st["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt_ours.exp_avg_sqs[i], st["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        if flags["amsgrad"]:
            torch.testing.assert_close(opt_ours.max_exp_avg_sqs[i], st["max_exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert opt_ours.steps[i].item() == st["step"].item() == 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1], dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=False)],
                         ids=["plain", "all-flags", "amsgrad-l2"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_every_dtype_against_float64_reference(backend, dtype, flags, contiguous):
    shapes = [(20, 10), (20,), (3, 17), ()] if not contiguous else SHAPES
    if not backend.supports(dtype):
        with pytest.raises(RuntimeError, match=rf"aiaas_fast.adam_ \({backend.name} backend\): supports .*params\[0\].dtype={dtype}"):
            run_both(dtype, flags, shapes=shapes, contiguous=contiguous, device=backend.device)
        return
    ours, ref, *_ = run_both(dtype, flags, shapes=shapes, contiguous=contiguous, device=backend.device)
    for p, q in zip(ours, ref):
        assert p.dtype == dtype
        assert_close(p, q.detach(), dtype, backend=backend)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["plain", "all-flags"])
def test_contiguous_views_at_odd_offsets(backend, flags):
    # Parameters as views into one flat buffer (as a flattened model keeps them): contiguous but
    # not 16-byte aligned. Kernels that use vector accesses where every address is aligned must
    # take their element-wise path here; one aligned view among them must not change that.
    sizes = [4097, 2, 2048 * 3, 20, 3]
    flat = rand(sum(sizes) + 7, device=backend.device)
    ours, at = [], 1  # offset 1: 4 bytes past an aligned start
    for n in sizes:
        ours.append(flat[at:at + n])
        at += n
    misaligned = [p.data_ptr() % 16 != 0 for p in ours]
    assert all(p.is_contiguous() for p in ours) and any(misaligned) and not all(misaligned), misaligned
    _, _, ref = step_with_torch(ours, flags, 3, backend.device)
    for i, (p, q) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6, msg=f"param {i} of {sizes[i]} elements")


def test_a_step_tensor_shared_by_params_counts_once_per_param(backend):
    # Not what torch.optim makes (a step per param), but a valid input: like torch's
    # multi-tensor Adam (_foreach_add_ on every step, then the update), each param counts
    # once and all of them then read the final count; the same on every backend.
    from torch.optim.adam import adam as torch_adam

    ps = [rand(6, 5, device=backend.device), rand(7, device=backend.device), rand(3, device=backend.device)]
    gs = [rand(*p.shape, device=backend.device) for p in ps]
    ref = [p.clone() for p in ps]
    state = lambda: ([torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps])
    (m, v), (rm, rv) = state(), state()
    shared, other = torch.zeros(()), torch.zeros(())
    ref_shared, ref_other = torch.zeros(()), torch.zeros(())
    for _ in range(2):
        adam_(ps, gs, m, v, [], [shared, other, shared], lr=1e-2, beta1=0.9, beta2=0.999)
        torch_adam(ref, gs, rm, rv, [], [ref_shared, ref_other, ref_shared], foreach=True, amsgrad=False,
                   beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
    assert shared.item() == ref_shared.item() == 4 and other.item() == ref_other.item() == 2
    for i, (p, q) in enumerate(zip(ps, ref)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"param {i}")


def test_betas_at_or_above_half_use_the_other_lerp_form():
    ours, ref, *_ = run_both(torch.float32, FLAGS[0], betas=(0.3, 0.6))
    for p, q in zip(ours, ref):
        assert_close(p, q.detach(), torch.float32)


def test_gradcheck_style_first_step_formula():
    # Step 1 in closed form: m = (1-b1) g, v = (1-b2) g^2, p -= lr/(1-b1) * m / (sqrt(v)/sqrt(1-b2) + eps).
    p, g = rand(257, dtype=torch.float64), rand(257, dtype=torch.float64)
    lr, b1, b2, eps = 0.05, 0.8, 0.99, 1e-3
    expected = p - lr / (1 - b1) * ((1 - b1) * g) / (((1 - b2) * g * g).sqrt() / math.sqrt(1 - b2) + eps)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    adam_([p], [g], [m], [v], [], [step], lr=lr, beta1=b1, beta2=b2, eps=eps)
    assert_close(p, expected, torch.float64)
    assert step.item() == 1.0


def test_opcheck():
    def sample(amsgrad):
        shapes = [(4, 3), (3,)]
        return (
            [rand(*s) for s in shapes], [rand(*s) for s in shapes], [torch.zeros(s) for s in shapes],
            [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes] if amsgrad else [],
            [torch.tensor(0.0) for _ in shapes],
        )

    for amsgrad in (False, True):
        kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=amsgrad, maximize=False,
                      decoupled_weight_decay=True)
        torch.library.opcheck(torch.ops.aiaas_fast.adam_.default, sample(amsgrad), kwargs)


def _args(n=2):
    ps = [rand(3, 2) for _ in range(n)]
    return ps, [rand(3, 2) for _ in ps], [torch.zeros(3, 2) for _ in ps], [torch.zeros(3, 2) for _ in ps], [], [torch.tensor(0.0) for _ in ps]


GOOD = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("name,value,message", [
    ("lr", -1.0, "invalid learning rate lr=-1"),
    ("lr", float("nan"), "invalid learning rate"),
    ("lr", float("inf"), "invalid learning rate"),
    ("eps", -1e-8, "invalid eps"),
    ("beta1", 1.0, r"invalid beta1=1 \(must be in \[0, 1\)\)"),
    ("beta2", -0.1, "invalid beta2"),
    ("beta2", float("nan"), "invalid beta2"),
    ("weight_decay", -0.1, "invalid weight_decay"),
])
def test_bad_hyperparameters_are_refused_before_any_update(name, value, message):
    ps, gs, ms, vs, mx, steps = _args()
    before = [p.clone() for p in ps]
    with pytest.raises(RuntimeError, match="aiaas_fast.adam_: " + message):
        adam_(ps, gs, ms, vs, mx, steps, **{**GOOD, name: value})
    assert all(torch.equal(a, b) for a, b in zip(ps, before)) and steps[0].item() == 0


def test_bad_tensor_lists_are_named():
    ps, gs, ms, vs, mx, steps = _args()
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        adam_(ps, gs[:1], ms, vs, mx, steps, **GOOD)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has shape \[2, 3\] but params\[1\] has shape \[3, 2\]"):
        adam_(ps, gs, [ms[0], torch.zeros(2, 3)], vs, mx, steps, **GOOD)
    with pytest.raises(RuntimeError, match=r"grads\[0\].dtype=torch.float64 but params\[0\].dtype=torch.float32"):
        adam_(ps, [gs[0].double(), gs[1]], ms, vs, mx, steps, **GOOD)
    with pytest.raises(RuntimeError, match="amsgrad needs one max_exp_avg_sq per parameter"):
        adam_(ps, gs, ms, vs, [], steps, **GOOD, amsgrad=True)
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] must be a one-element floating-point tensor"):
        adam_(ps, gs, ms, vs, mx, [torch.zeros(2), steps[1]], **GOOD)
    with pytest.raises(RuntimeError, match=r"call once per \(device, dtype\) group"):
        adam_([ps[0], ps[1].double()], [gs[0], gs[1].double()], [ms[0], ms[1].double()], [vs[0], vs[1].double()], mx, steps, **GOOD)


def test_nan_gradient_propagates_as_torch():
    ours = [rand(5)]
    ours[0].grad = rand(5)
    ours[0].grad[2] = float("nan")
    refp = ours[0].clone().requires_grad_()
    refp.grad = ours[0].grad.clone()
    opt = OurAdam(ours, 1e-2, (0.9, 0.999), 1e-8, 0.0, True, False, False)
    opt.step()
    torch.optim.Adam([refp], lr=1e-2, amsgrad=True).step()
    assert_close(ours[0], refp.detach(), torch.float32)
    assert torch.isnan(ours[0][2])


def test_update_of_a_tensor_saved_for_backward_is_caught():
    # adam_ bumps version counters, as in-place torch ops do, so autograd refuses a stale graph.
    w = rand(3, 4, requires_grad=True)
    loss = (w * w).sum()  # saves w
    with torch.no_grad():
        adam_([w], [rand(3, 4)], [torch.zeros(3, 4)], [torch.zeros(3, 4)], [], [torch.tensor(0.0)], lr=0.1, beta1=0.9, beta2=0.999)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_triton_adam_refuses_graph_capture(backend):
    # It reads its steps and copies its tables from the host each call: it cannot be
    # captured, and says so rather than failing inside the capture.
    if backend.name != "triton" or backend.device != "cuda":
        pytest.skip("graph capture of the Triton Adam on a GPU")
    p, g = [torch.randn(8, device="cuda")], [torch.randn(8, device="cuda")]
    m, v, steps = [torch.zeros(8, device="cuda")], [torch.zeros(8, device="cuda")], [torch.tensor(0.0)]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            adam_(p, g, m, v, [], steps, lr=1e-2, beta1=0.9, beta2=0.999)


def test_empty_lists_are_nothing_to_do_and_a_meta_tensor_is_checked():
    adam_([], [], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.999)  # as torch's functional Adam
    p, m, v, s = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[7\] but params\[0\] has shape \[3\]"):
        adam_([p], [torch.ones(7, device="meta")], [m], [v], [], [s], lr=0.1, beta1=0.9, beta2=0.999)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        adam_([p], [torch.ones(3, device="meta")], [m], [v], [], [s], lr=0.1, beta1=0.9, beta2=0.999)
    assert torch.equal(p, torch.ones(3)) and s.item() == 0.0


def test_amsgrad_keeps_a_nan_maximum_as_torch_maximum(backend):
    # torch.optim.Adam takes torch.maximum(max_exp_avg_sq, exp_avg_sq): a NaN already in the
    # running maximum (a state loaded from a diverged run) stays NaN and so does the parameter,
    # even where the new exp_avg_sq is finite; a maximum that drops it would hide the NaN.
    p = rand(257, device=backend.device)
    ours, ref = p.clone(), p.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=1e-2, amsgrad=True)
    ref.grad = torch.zeros_like(ref)
    opt.step()  # creates torch's state: then both start from the same hand-set one
    st = opt.state[ref]
    st["exp_avg"].copy_(rand(257, device=backend.device))
    st["exp_avg_sq"].copy_(rand(257, device=backend.device).abs())
    st["max_exp_avg_sq"].copy_(rand(257, device=backend.device).abs())
    st["max_exp_avg_sq"][::7] = float("nan")
    with torch.no_grad():
        ref.copy_(ours)
    m, v, vmax, step = (st[k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"))
    g = rand(257, device=backend.device)
    ref.grad = g.clone()
    adam_([ours], [g], [m], [v], [vmax], [step], lr=1e-2, beta1=0.9, beta2=0.999, amsgrad=True)
    opt.step()
    assert torch.isnan(vmax[::7]).all() and torch.isnan(ours[::7]).all()
    torch.testing.assert_close(vmax, st["max_exp_avg_sq"], rtol=1e-5, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("beta1", [0.3, 0.5, 0.9])
def test_exp_avg_has_the_bits_of_torchs_lerp_at_every_beta1(beta1):
    # torch.optim.Adam updates exp_avg with lerp_, whose formula switches at weight 0.5 (weight
    # 1 - beta1 = 0.5 exactly takes the second form): the CPU kernel's first moment has the same
    # bits as torch's float32 one for weights below, at and above it.
    ours = [rand(5000)]
    ref = [ours[0].clone().requires_grad_()]
    opt_ours = OurAdam(ours, 1e-2, (beta1, 0.999), 1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                       decoupled_weight_decay=False)
    opt_ref = torch.optim.Adam(ref, lr=1e-2, betas=(beta1, 0.999))
    for _ in range(3):
        g = rand(5000)
        ours[0].grad, ref[0].grad = g, g.clone()
        opt_ours.step()
        opt_ref.step()
    assert torch.equal(opt_ours.exp_avgs[0], opt_ref.state[ref[0]]["exp_avg"])
