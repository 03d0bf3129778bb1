"""The fused MLP kernel (aiaas_fast.triton.fused_mlp) against autograd on plain PyTorch: one
pass gives the mean squared error and every parameter's gradient. On a GPU it runs
compiled; without one, in Triton's interpreter on the CPU."""
import pytest
import torch
from torch import nn

from aiaas_fast.engine import mlp_layers
from helpers import rand, sequential, triton_interpreter_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.skipif(DEVICE == "cpu" and triton_interpreter_reason() is not None,
                                 reason=str(triton_interpreter_reason())),
              pytest.mark.usefixtures("ieee_float32"),  # the kernel follows torch's TF32 setting, as the reference
              pytest.mark.gpu]  # on the GPU where there is one (DEVICE)


def fused(model, **kw):
    from aiaas_fast.triton.fused_mlp import FusedMLP

    return FusedMLP(mlp_layers(model), **kw)


def reference(model, x, y):
    loss = nn.functional.mse_loss(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


def assert_matches(model, x, y, f=None):
    f = f or fused(model)
    f.flat.fill_(float("nan"))  # poisoned: every gradient element must be written
    loss = f.loss_and_grads(x, y)
    ref_loss, ref_grads = reference(model, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for name, g, r in zip([n for n, _ in model.named_parameters()], f.grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return f


@pytest.mark.parametrize("widths,batch,final_relu", [
    ([10, 20, 1], 64, False),       # the seed network
    ([13, 37, 5, 3], 67, True),     # odd widths, a partial tile, more tiles than programs
    ([7, 128, 1], 33, False),       # the widest layer the kernel takes
    ([1, 1], 1, False),             # one layer, one row
    ([5, 16, 16, 16, 16, 2], 200, False),  # deep
    ([128, 128, 128], 18, True),
])
def test_loss_and_gradients_match_autograd(widths, batch, final_relu):
    model = sequential(widths, final_relu=final_relu, device=DEVICE)
    assert_matches(model, rand(batch, widths[0], device=DEVICE), rand(batch, widths[-1], device=DEVICE))


def test_without_bias_and_with_a_hidden_layer_without_relu():
    torch.manual_seed(3)
    for bias in (False, True):
        model = nn.Sequential(nn.Linear(6, 24, bias=bias), nn.Linear(24, 17, bias=bias), nn.ReLU(),
                              nn.Linear(17, 3, bias=bias)).to(DEVICE)
        assert_matches(model, rand(45, 6, device=DEVICE), rand(45, 3, device=DEVICE))


def test_strided_inputs_and_targets():
    model = sequential([9, 30, 4], device=DEVICE)
    x = rand(50, 9, contiguous=False, device=DEVICE)
    y = rand(50, 4, contiguous=False, device=DEVICE)
    assert not x.is_contiguous() and not y.is_contiguous()
    assert_matches(model, x, y)


def test_forward_matches_the_model():
    model = sequential([11, 40, 40, 2], final_relu=True, device=DEVICE)
    f = fused(model)
    for rows in (1, 17, 300):
        x = rand(rows, 11, device=DEVICE)
        out = torch.full((rows, 2), float("nan"), device=DEVICE)  # poisoned: every element must be written
        with torch.no_grad():
            torch.testing.assert_close(f.forward(x, out), model(x), rtol=1e-5, atol=1e-6)
    assert f.forward(rand(0, 11, device=DEVICE)).shape == (0, 2)


def test_same_bits_on_every_run_and_no_stale_gradients():
    model = sequential([8, 50, 3], device=DEVICE)
    f = fused(model)
    x, y = rand(150, 8, device=DEVICE), rand(150, 3, device=DEVICE)
    first = (f.loss_and_grads(x, y).clone(), [g.clone() for g in f.grads])
    assert_matches(model, x[:20], y[:20], f)  # a different batch in between
    again = (f.loss_and_grads(x, y), f.grads)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_writes_stay_inside_the_buffers():
    # Under the interpreter a write out of bounds corrupts the heap silently: guard the
    # kernel's scratch and partial buffers with a tail of NaNs that must survive.
    model = sequential([13, 37, 5, 3], device=DEVICE)
    f = fused(model, programs=3)
    guards, views = {}, {}
    for name in ("_part", "_scratch"):
        buf = getattr(f, name)
        big = torch.full((buf.numel() + 4096,), float("nan"), device=DEVICE)
        views[name] = big[:buf.numel()].view(buf.shape)
        guards[name] = big[buf.numel():]
    f._bind(views["_part"], views["_scratch"])
    x, y = rand(250, 13, device=DEVICE), rand(250, 3, device=DEVICE)
    assert_matches(model, x, y, f)
    assert_matches(model, x[:40], y[:40], f)  # one program alone
    f.forward(x)
    for name, tail in guards.items():
        assert tail.isnan().all(), f"{name} was written past its end"


def test_what_the_kernel_refuses():
    from aiaas_fast.triton.fused_mlp import unsupported_reason

    assert unsupported_reason(mlp_layers(sequential([10, 20, 1], device=DEVICE))) is None
    assert "up to 128" in unsupported_reason(mlp_layers(sequential([10, 129, 1], device=DEVICE)))
    mixed = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1, bias=False)).to(DEVICE)
    assert "bias on every layer" in unsupported_reason(mlp_layers(mixed))
    double = sequential([3, 4, 1], device=DEVICE).double()  # mlp_layers refuses it first: build the list
    assert "float32" in unsupported_reason([(double[0], True), (double[2], False)])
    with pytest.raises(ValueError, match="up to 128"):
        fused(sequential([200, 1], device=DEVICE))
    with pytest.raises(ValueError, match="at least one row"):
        fused(sequential([3, 1], device=DEVICE)).loss_and_grads(rand(0, 3, device=DEVICE), rand(0, 1, device=DEVICE))
