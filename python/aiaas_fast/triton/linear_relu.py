"""``linear_relu`` as Triton kernels: ``relu(x @ weight.T + bias)`` and its backward.

One tiled matrix-product kernel serves all three products, told by constexpr flags what
to fuse:

- forward, ``out = x @ W^T``: bias add and ReLU in the epilogue, on the float32
  accumulator, so the pre-activation never reaches memory;
- ``grad_x = (g * [out > 0]) @ W``: the ReLU mask is applied to each tile of g as it is
  loaded (read from the saved output), no masked-gradient tensor is written;
- ``grad_weight = (g * [out > 0])^T @ x``: same masking, and the bias gradient (the
  column sums of the masked gradient) summed from the tiles this kernel already loads,
  in a fixed order, so it costs no extra pass and has the same bits on every run with one
  configuration (autotuning picks by timing: another process may choose other tiles, and
  with them another summation order).

Precision: products accumulate in float32. For float32 inputs the dot follows torch's TF32
setting for CUDA matmuls as torch.mm does (``aiaas_fast._tf32``): ``input_precision="ieee"``
by default (float32 products, no TF32), ``"tf32"`` when the user allows TF32.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _checks
from .._flops import linear_relu_backward_flops, linear_relu_flops
from .._tf32 import cuda_matmul_allows_tf32
from ._common import DTYPES, INTERPRET, autotuning, check_device, is_fake, launcher, on_device, register

OP = "aiaas_fast.linear_relu"


def _configs():
    if not autotuning():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)]
    c = lambda m, n, k, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
    return [
        # Hopper (H100/H200, 228 KB shared memory): large tiles for wgmma, two warp groups.
        c(128, 256, 64, 8, 3), c(256, 128, 64, 8, 3), c(128, 128, 64, 8, 4), c(128, 128, 64, 4, 4),
        # Ampere (A100, 164 KB): 4 warps, deeper pipelines of shorter K steps.
        c(128, 128, 32, 4, 4), c(128, 64, 32, 4, 4), c(64, 128, 32, 4, 4),
        # Small or skinny problems (and float32 IEEE, whose tiles take twice the memory).
        c(64, 64, 32, 4, 4), c(32, 64, 64, 4, 3),
    ]


def _bucket(n: int) -> int:
    """Autotuning key: the next power of two, so every batch size is not tuned afresh."""
    return 1 << max(0, int(n) - 1).bit_length()


# Tuned per size bucket, product, bias and precision (IEEE float32 and TF32 want other tiles);
# Triton adds the tensors' dtypes to the key itself.
# Not specialized on: the autotuning keys and MODE (the kernel does not read them) and the row
# count M (row masks do not vectorize anyway): each class of value (1, a multiple of 16, other)
# would be one more compilation, and odd-sized calls made hundreds. N, K and the strides are:
# a unit stride, or a multiple of 16, is what lets the loads vectorize and pipeline.
@triton.autotune(configs=_configs(), key=["M_KEY", "N_KEY", "K_KEY", "MODE", "HAS_BIAS", "PRECISION"])
@triton.jit(do_not_specialize=["M", "M_KEY", "N_KEY", "K_KEY", "MODE"])
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, mask_ptr, bias_ptr, rowsum_ptr,
    M, N, K, M_KEY, N_KEY, K_KEY, MODE,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_mm, stride_mk,
    MASK_A: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ROWSUM: tl.constexpr, WRITE_C: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] (any strides), A masked by [mask > 0] if MASK_A, then
    bias + ReLU if asked; ROWSUM also writes the row sums of (masked) A, from the
    programs of the first column of tiles."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share their B tiles in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap onto valid ones (their results are not stored),
    # so only the K edge needs a load mask. Offsets in int64: rows x row stride passes 2^31
    # for 16M rows of 128 features.
    rm_load = (rm % M).to(tl.int64)
    rn_load = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + rm_load[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_load[None, :] * stride_bn
    if MASK_A:
        m_ptrs = mask_ptr + rm_load[:, None] * stride_mm + rk[None, :] * stride_mk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float64)  # a tile's sum in float32, the running sum in float64
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if MASK_A:
            keep = ~(tl.load(m_ptrs, mask=k_ok[None, :], other=0.0) <= 0)  # a NaN output passes, as threshold_backward
            a = tl.where(keep, a, tl.zeros_like(a))
            m_ptrs += BLOCK_K * stride_mk
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1).to(tl.float64)
        if WRITE_C:
            if UPCAST:  # the interpreter's tl.dot mishandles bfloat16 operands; exact in float32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if WRITE_C:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_load).to(tl.float32)[None, :]
        if RELU:
            acc = tl.where(acc < 0, 0.0, acc)  # NaN stays NaN, as torch.relu
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + rm, rowsum, mask=rm < M)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and cuda_matmul_allows_tf32():
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit inputs: the setting is unused


def _mm(a: Tensor, b: Tensor, c: Optional[Tensor], mode: int, *, mask: Optional[Tensor] = None, bias: Optional[Tensor] = None,
        relu: bool = False, rowsum: Optional[Tensor] = None) -> None:
    """c = a @ b with the fusions asked for; a (M, K), b (K, N), c (M, N) or None (row sums only)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or (c is not None and N == 0) or is_fake(a, b):
        return
    dummy = a
    c_ = c if c is not None else dummy
    mask_ = mask if mask is not None else a
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(max(N, 1), meta["BLOCK_N"]),)
    with on_device(a):
        launcher(_matmul_kernel)[grid](
            a, b, c_, mask_, bias if bias is not None else dummy, rowsum if rowsum is not None else dummy,
            M, max(N, 1), K, _bucket(M), _bucket(N), _bucket(K), mode,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c_.stride(0) if c is not None else 0,
            c_.stride(1) if c is not None else 0, mask_.stride(0), mask_.stride(1),
            MASK_A=mask is not None, HAS_BIAS=bias is not None, RELU=relu, ROWSUM=rowsum is not None,
            WRITE_C=c is not None, PRECISION=_precision(a.dtype), UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        )


@register("aiaas_fast::triton_linear_relu")
def triton_linear_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _checks.linear_relu_args(x, weight, bias, DTYPES, "triton")
    check_device(OP, x)
    in_f, out_f = weight.shape[1], weight.shape[0]
    x2 = _rows(x, in_f)
    out = torch.empty((x2.shape[0], out_f), dtype=x.dtype, device=x.device)
    if in_f == 0:  # an empty product: relu(bias)
        out.copy_(torch.relu(bias).expand_as(out) if bias is not None else torch.zeros_like(out))
    else:  # the kernel reads the bias with unit stride: a strided or expanded one is copied
        _mm(x2, weight.t(), out, 0, bias=None if bias is None else bias.contiguous(), relu=True)
    return out.view(*x.shape[:-1], out_f)


@register("aiaas_fast::triton_linear_relu_backward")
def triton_linear_relu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, out: Tensor,
                                output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); those not asked for in output_mask are empty tensors."""
    _checks.linear_relu_backward_args(grad_out, x, weight, out, DTYPES, "triton")
    check_device(OP, x)
    in_f, out_f = weight.shape[1], weight.shape[0]
    g = _rows(grad_out, out_f)
    o = _rows(out, out_f)
    x2 = _rows(x, in_f)
    grad_x, grad_w, grad_b = (x.new_empty((0,)) for _ in range(3))  # outputs may not alias each other
    if output_mask[0]:
        grad_x = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if out_f == 0:
            grad_x.zero_()
        else:
            _mm(g, weight, grad_x, 1, mask=o)
        grad_x = grad_x.view(x.shape)
    if output_mask[1] or output_mask[2]:
        # grad_weight = gm^T @ x; the bias gradient from the same tiles (summed in float64: a
        # float32 running sum over thousands of rows drifts by hundreds of ulps).
        sums = torch.zeros((out_f,), dtype=torch.float64, device=x.device) if output_mask[2] else None
        gw = torch.empty((out_f, in_f), dtype=x.dtype, device=x.device) if output_mask[1] else None
        if g.shape[0] == 0:
            if gw is not None:
                gw.zero_()
        elif gw is not None and in_f > 0:
            _mm(g.t(), x2, gw, 2, mask=o.t(), rowsum=sums)
        else:  # only the bias gradient (or nothing to multiply): the row sums alone
            if gw is not None:
                gw.zero_()
            if sums is not None:
                _mm(g.t(), x2[:, :1] if in_f > 0 else g[:, :1], None, 3, mask=o.t(), rowsum=sums)
        if gw is not None:
            grad_w = gw
        if sums is not None:
            grad_b = sums.to(x.dtype)
    return grad_x, grad_w, grad_b


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t as (rows, cols), rows the product of its leading sizes: also for cols == 0, where
    reshape(-1, 0) cannot infer the rows."""
    return t.reshape(math.prod(t.shape[:-1]), cols)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output)  # the ReLU mask is read back from the output
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if torch.is_grad_enabled():  # backward(create_graph=True): ops autograd records (the kernels have no derivative)
        # threshold_backward, as torch's relu: NaN passes, and a (zero) path through out keeps
        # the gradient in the graph where nothing else would (frozen weights).
        gm = torch.ops.aten.threshold_backward(grad, out, 0)
        gm2 = _rows(gm, weight.shape[0])
        return (gm @ weight if mask[0] else None, gm2.t() @ _rows(x, weight.shape[1]) if mask[1] else None,
                gm2.sum(0) if mask[2] else None)
    gx, gw, gb = torch.ops.aiaas_fast.triton_linear_relu_backward(grad.contiguous(), x, weight, out, mask)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None


triton_linear_relu.register_autograd(_backward, setup_context=_setup_context)
# FlopCounterMode sees the op itself (only FunctionalTensorMode, i.e. torch.compile, decomposes
# a triton_op into its kernels): counted as the products it computes, as the native op.
register_flop_formula(torch.ops.aiaas_fast.triton_linear_relu)(linear_relu_flops)
register_flop_formula(torch.ops.aiaas_fast.triton_linear_relu_backward)(linear_relu_backward_flops)
