"""The ``reference`` backend: each op as plain PyTorch composite code, differentiated by
autograd. It is the oracle the tests compare the other backends with, and the fallback on
devices that have neither native nor Triton kernels. Same arguments, checks and math as
the fused ops, none of their speed."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks

__all__ = ["linear_relu", "mse_loss", "adam_"]


def linear_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if not torch.compiler.is_compiling():  # traced, the composite ops raise their own errors
        _checks.linear_relu_args(x, weight, bias)
    return F.relu(F.linear(x, weight, bias))


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    _checks.reduction("aiaas_fast.mse_loss", reduction)
    if not torch.compiler.is_compiling():
        _checks.mse_loss_args(input, target)
    diff = input - target
    loss = diff * diff
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


@torch.no_grad()
def adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
          max_exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[Tensor], *, lr: float, beta1: float, beta2: float,
          weight_decay: float = 0.0, eps: float = 1e-8, amsgrad: bool = False, maximize: bool = False,
          decoupled_weight_decay: bool = False) -> None:
    """torch.optim.Adam's single-tensor step, written out; 16-bit tensors are computed in
    float32 and rounded once, as the native and Triton kernels do (float16 state would
    underflow eps and v). Every step is incremented before the update, as torch's multi-tensor
    Adam does: a step tensor shared by params counts once per param, all read the final count."""
    _checks.adam_hyperparameters(lr, beta1, beta2, weight_decay, eps)
    _checks.adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)
    for step in state_steps:
        step.add_(1)
    ts = [step.item() for step in state_steps]
    for i in range(len(params)):
        low = params[i].dtype in (torch.float16, torch.bfloat16)
        up = (lambda t: t.float()) if low else (lambda t: t)
        p, g, m, v = up(params[i]), up(grads[i]), up(exp_avgs[i]), up(exp_avg_sqs[i])
        vmax = up(max_exp_avg_sqs[i]) if amsgrad else None
        _adam_tensor(p, g, m, v, vmax, ts[i], lr, beta1, beta2, weight_decay, eps, maximize, decoupled_weight_decay)
        if low:
            for dst, src in ((params[i], p), (exp_avgs[i], m), (exp_avg_sqs[i], v), *(((max_exp_avg_sqs[i], vmax),) if amsgrad else ())):
                dst.copy_(src)


def _adam_tensor(p, g, m, v, vmax, t, lr, beta1, beta2, weight_decay, eps, maximize, decoupled_weight_decay):
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
        v = vmax
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = math.sqrt(1 - beta2**t)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)
