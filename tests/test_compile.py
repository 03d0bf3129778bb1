"""torch.compile(fullgraph=True) traces models that use the ops, with no graph break."""
import pytest
import torch
import torch.nn.functional as F

from aiaas_fast.ops import adam_, linear_relu, mse_loss
from helpers import assert_close, rand


def seed_network_loss(x, y, w1, b1, w2, b2):
    # The project's first network: Linear(10, 20) -> ReLU -> Linear(20, 1), MSE loss.
    return mse_loss(F.linear(linear_relu(x, w1, b1), w2, b2), y)


def _params():
    return [rand(20, 10, scale=0.3, requires_grad=True), rand(20, requires_grad=True),
            rand(1, 20, scale=0.2, requires_grad=True), rand(1, requires_grad=True)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_seed_network_forward_backward_compiles_fullgraph(backend):
    torch._dynamo.reset()
    x, y = rand(64, 10), rand(64, 1)
    params = _params()
    compiled = torch.compile(seed_network_loss, fullgraph=True, backend=backend)
    loss = compiled(x, y, *params)
    grads = torch.autograd.grad(loss, params)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = F.mse_loss(F.linear(F.relu(F.linear(x, ref_params[0], ref_params[1])), ref_params[2], ref_params[3]), y)
    ref_grads = torch.autograd.grad(ref, ref_params)
    assert_close(loss, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32)


def test_adam_update_compiles_fullgraph():
    torch._dynamo.reset()
    params = [rand(5, 3), rand(3)]
    grads = [rand(5, 3), rand(3)]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    ref = [p.clone().requires_grad_() for p in params]
    for r, g in zip(ref, grads):
        r.grad = g.clone()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=0.01, beta1=0.9, beta2=0.999)

    opt = torch.optim.Adam(ref, lr=0.01)
    for _ in range(3):
        step(params, grads, state[0], state[1], steps)
        opt.step()
    for p, r in zip(params, ref):
        assert_close(p, r.detach(), torch.float32)
    assert [s.item() for s in steps] == [3.0, 3.0]
