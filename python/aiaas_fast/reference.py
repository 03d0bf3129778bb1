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
    """torch.optim.Adam's single-tensor step, written out (in the params' dtype, as torch)."""
    _checks.adam_hyperparameters(lr, beta1, beta2, weight_decay, eps)
    _checks.adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad)
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        g = -g if maximize else g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        step.add_(1)
        t = step.item()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)
