"""``mse_loss`` as Triton kernels: one pass over input and target writes the gradient
(for grad_output = 1) and each block's sum of squares; a second, one-program kernel adds
the block sums in block order. No float atomics: the loss has the same bits on every run
and every GPU of a kind.

What the backward needs is saved deliberately: the gradient the forward already wrote,
so the backward is one scaling by grad_output, or none when grad_output is 1 and reading
it is free or pays (for a float16 mean it recomputes from the saved inputs instead, as the
native op does: 2 (x - t) / N may fall below float16's range before a loss scale would bring
it back).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import DTYPES, check_device, is_fake, launcher, on_device, register

OP = "aiaas_fast.mse_loss"
#: Reading a CUDA grad_output in the backward is a device sync (the GPU idles while the host
#: launches the next kernels, about 10 us); scaling the saved gradient reads and writes it
#: (64 MB for 8M float32 elements: about 15 us on an H200). Above this size the read pays;
#: the native op uses the same rule (csrc/cuda/mse_loss.cpp).
SYNC_WORTH_ELEMENTS = 1 << 23
BLOCK = 4096  # elements per program: enough bytes in flight per SM to stream at full bandwidth
SUM_BLOCK = 1024


@triton.jit
def _mse_kernel(x_ptr, t_ptr, grad_ptr, elems_ptr, partial_ptr, n, grad_scale,
                WRITE_GRAD: tl.constexpr, WRITE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = x - t
    sq = d * d
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, (d * grad_scale).to(grad_ptr.dtype.element_ty), mask=ok)
    if WRITE_ELEMS:
        tl.store(elems_ptr + offs, sq.to(elems_ptr.dtype.element_ty), mask=ok)
    tl.store(partial_ptr + pid, tl.sum(sq, axis=0))


@triton.jit
def _sum_kernel(partial_ptr, loss_ptr, count, scale, BLOCK: tl.constexpr):
    # One program, a fixed order: lane i adds partials i, i + BLOCK, ..., then one tree sum.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < count, other=0.0)
    tl.store(loss_ptr, (tl.sum(acc, axis=0) * scale).to(loss_ptr.dtype.element_ty))


@register("aiaas_fast::triton_mse_loss")
def triton_mse_loss(input: Tensor, target: Tensor, reduction: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss, gradient of the loss for grad_output = 1); the gradient is an empty tensor
    when compute_grad is False."""
    _checks.reduction(OP, reduction)
    shape = _checks.mse_loss_args(input, target, DTYPES, "triton")
    check_device(OP, input)
    if input.shape != shape or target.shape != shape:
        input, target = input.expand(shape), target.expand(shape)
    x, t = input.contiguous(), target.contiguous()
    n = x.numel()
    grad = torch.empty(shape, dtype=x.dtype, device=x.device) if compute_grad else x.new_empty((0,))
    elems = torch.empty(shape, dtype=x.dtype, device=x.device) if reduction == "none" else None
    loss = elems if elems is not None else torch.empty((), dtype=x.dtype, device=x.device)
    if n == 0:
        if elems is None:  # the mean of nothing is NaN, the sum 0, as torch
            loss.fill_(float("nan") if reduction == "mean" else 0.0)
        return loss, grad
    if is_fake(x):
        return loss, grad
    blocks = triton.cdiv(n, BLOCK)
    partial = torch.empty((blocks,), dtype=torch.float32, device=x.device)
    grad_scale = 2.0 / n if reduction == "mean" else 2.0
    with on_device(x):
        launcher(_mse_kernel)[(blocks,)](x, t, grad if compute_grad else x, elems if elems is not None else x, partial,
                                         n, grad_scale, WRITE_GRAD=compute_grad, WRITE_ELEMS=elems is not None,
                                         BLOCK=BLOCK, num_warps=8)
        if elems is None:
            launcher(_sum_kernel)[(1,)](partial, loss, blocks, 1.0 / n if reduction == "mean" else 1.0,
                                        BLOCK=SUM_BLOCK, num_warps=4)
    return loss, grad


def _setup_context(ctx, inputs, output):
    input, target, reduction, compute_grad = inputs
    _, grad = output
    ctx.mean = reduction == "mean"
    ctx.numel = input.expand(torch.broadcast_shapes(input.shape, target.shape)).numel()
    ctx.input_shape, ctx.target_shape = input.shape, target.shape
    ctx.has_grad = compute_grad
    ctx.save_for_backward(input, target, grad)
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)


def _grad_output_value(grad_loss: Tensor, work: int):
    """grad_output's value where reading it is free (a CPU scalar) or pays (a gradient of
    ``work`` >= SYNC_WORTH_ELEMENTS elements on a GPU, outside graph capture); None where it
    may not be read: traced by torch.compile or functorch, or under a dispatch mode."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if (grad_loss.numel() != 1 or type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(grad_loss) or _get_current_dispatch_mode() is not None):
        return None
    if grad_loss.device.type == "cuda":
        if work < SYNC_WORTH_ELEMENTS:
            return None
        with torch.cuda.device(grad_loss.device):
            if torch.cuda.is_current_stream_capturing():
                return None
    elif grad_loss.device.type != "cpu":
        return None
    return grad_loss.item()


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return None, None, None, None
    input, target, saved = ctx.saved_tensors
    if torch.is_grad_enabled() or not ctx.has_grad or (ctx.mean and input.dtype == torch.float16):
        # (With grad enabled, backward(create_graph=True): from ops autograd records, so the
        # gradient has a derivative; the saved one has none.)
        diff = input.float() - target.float()
        grad = (diff * (grad_loss.float() * (2.0 / max(ctx.numel, 1) if ctx.mean else 2.0))).to(input.dtype)
    elif _grad_output_value(grad_loss, saved.numel()) == 1.0:
        # loss.backward(): the saved gradient is the answer, handed on without a pass (once this
        # node's saved tensors are released, AccumulateGrad takes it without a copy).
        grad = saved
    else:
        grad = saved * grad_loss
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = grad.sum_to_size(ctx.input_shape) if grad.shape != ctx.input_shape else grad
    if ctx.needs_input_grad[1]:
        grad_target = (-grad).sum_to_size(ctx.target_shape) if grad.shape != ctx.target_shape else -grad
    return grad_input, grad_target, None, None


triton_mse_loss.register_autograd(_backward, setup_context=_setup_context)
