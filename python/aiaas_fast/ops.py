"""Functional wrappers for the ops, and the fake (shape-only) kernels of the native
``torch.ops.aiaas_fast`` operators for ``torch.compile``.

Each wrapper runs the op on the backend in effect for its tensors' device
(``aiaas_fast.set_backend``, see ``backend.py``): the native operators, whose schemas,
kernels and autograd formulas live in C++ (``csrc/ops/<op>.cpp``); the Triton kernels
(``aiaas_fast/triton/<op>.py``, ``torch.ops.aiaas_fast.triton_<op>``); or the plain
PyTorch reference (``reference.py``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _checks, reference
from ._flops import linear_relu_backward_flops, linear_relu_flops
from . import backend as _backend

__all__ = ["linear_relu", "mse_loss", "adam_"]

_ops = torch.ops.aiaas_fast


# ---------------------------------------------------------------- linear_relu
def linear_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``relu(x @ weight.T + bias)`` in one op. ``weight`` is ``(out_features, in_features)``
    as in ``nn.Linear``; ``x`` is ``(..., in_features)``."""
    backend = _backend.resolve("linear_relu", x.device)
    if _functorch_active():
        backend = "reference"
    if backend == "native":
        return _ops.linear_relu.default(x, weight, bias)
    x, weight, bias = _autocast(x, weight, bias)
    if backend == "triton":
        return _ops.triton_linear_relu.default(x, weight, bias)
    return reference.linear_relu(x, weight, bias)


def _functorch_active() -> bool:
    """Inside torch.func transforms (grad, vjp, jacrev, jvp, vmap, hessian) the ops run as their
    plain PyTorch composition: their autograd formulas are C++ autograd Functions, which
    functorch cannot transform, and they have no batching rule."""
    return torch._C._are_functorch_transforms_active()


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under ``torch.autocast``, the inputs in its dtype, as aten::linear takes them (the
    native op does this in C++, registered for the Autocast keys)."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    cast = (lambda t: t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t)
    return cast(x), cast(weight), cast(bias)


def _autocast_fp32(*tensors: Tensor):
    """Under ``torch.autocast``, 16-bit floating inputs in float32, as autocast runs the ops
    of its float32 list (aten::mse_loss among them)."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


# The same refusals as csrc/ops/checks.cpp, for tracing with fake tensors.
_check_linear_relu = _checks.linear_relu_args


@torch.library.register_fake("aiaas_fast::linear_relu")
def _linear_relu_fake(x, weight, bias=None):
    _check_linear_relu(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("aiaas_fast::linear_relu_backward")
def _linear_relu_backward_fake(grad_out, x, weight, out, output_mask):
    return (
        x.new_empty(x.shape) if output_mask[0] else None,
        weight.new_empty(weight.shape) if output_mask[1] else None,
        weight.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


register_flop_formula(_ops.linear_relu)(linear_relu_flops)
register_flop_formula(_ops.linear_relu_backward)(linear_relu_backward_flops)


# ---------------------------------------------------------------- mse_loss
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Same values as ``torch.nn.functional.mse_loss``. When a gradient will be needed,
    the forward pass also writes it, so the backward pass only scales it.

    As ``F.mse_loss``: a target of another size warns (broadcasting, a common mistake), and
    input and target of different dtypes compute in their promoted dtype (the operator
    itself takes one dtype)."""
    if isinstance(input, Tensor) and isinstance(target, Tensor):
        if target.size() != input.size() and not torch.compiler.is_compiling():  # (Dynamo cannot trace warn)
            warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                          "This will likely lead to incorrect results due to broadcasting. Please ensure they have "
                          "the same size.", stacklevel=2)
        if target.dtype != input.dtype:
            # F.mse_loss broadcasts before promoting, so a 0-dim side counts in full
            # (torch.result_type would let it lose: float16 against a float64 scalar tensor).
            common = torch.promote_types(input.dtype, target.dtype)
            input, target = input.to(common), target.to(common)
    backend = _backend.resolve("mse_loss", input.device)
    if _functorch_active():
        backend = "reference"
    if backend != "native":  # (the native op autocasts in C++)
        input, target = _autocast_fp32(input, target)
    if backend == "reference":
        return reference.mse_loss(input, target, reduction)
    compute_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    op = _ops.mse_loss if backend == "native" else _ops.triton_mse_loss
    loss, _ = op.default(input, target, reduction, compute_grad)
    return loss


@torch.library.register_fake("aiaas_fast::mse_loss")
def _mse_loss_fake(input, target, reduction="mean", compute_grad=True):
    op = "aiaas_fast.mse_loss"
    torch._check_value(reduction in ("none", "mean", "sum"), lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got '{reduction}'")
    torch._check(input.device == target.device, lambda: f"{op}: input and target must be on the same device, got input on {input.device} and target on {target.device}")
    torch._check(input.dtype == target.dtype, lambda: f"{op}: input and target must have the same dtype, got input.dtype={input.dtype} and target.dtype={target.dtype}")
    try:
        shape = torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise RuntimeError(f"{op}: input and target shapes are incompatible: input {list(input.shape)}, target {list(target.shape)}") from None
    loss = input.new_empty(shape if reduction == "none" else ())
    return loss, (input.new_empty(shape) if compute_grad else None)


# ---------------------------------------------------------------- adam_
def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    """One Adam (AdamW with ``decoupled_weight_decay``) step on every tensor of a group,
    in place, including the step counters. Same math as ``torch.optim.Adam``."""
    params = list(params)
    if not params and not any(map(len, (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps))):
        return  # nothing to update (the operator itself needs a tensor to dispatch on)
    backend = _backend.resolve("adam_", params[0].device if params else torch.device("cpu"))
    args = (params, list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps))
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay), eps=float(eps),
                 amsgrad=bool(amsgrad), maximize=bool(maximize), decoupled_weight_decay=bool(decoupled_weight_decay))
    if backend == "native":
        _ops.adam_.default(*args, **hyper)
    elif backend == "triton":
        _ops.triton_adam_.default(*args, **hyper)
    else:
        reference.adam_(*args, **hyper)


@torch.library.register_fake("aiaas_fast::adam_")
def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
               weight_decay, eps, amsgrad, maximize, decoupled_weight_decay):
    # Also the kernel for a call with a tensor on "meta": the same refusals (a device mismatch
    # among them), not a silent no-op.
    _checks.adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                         state_dtypes=(torch.float32,))
    return None
