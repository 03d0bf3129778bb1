"""A whole MLP training step (forward, mean-squared error, backward) in one Triton kernel,
for widths up to 128: tiny-cuda-nn's "fully fused MLP", in float32.

For narrow layers a step of op-by-op PyTorch is dozens of launches, each moving a
(batch, width) activation through memory for a few FLOPs per byte. Here each program
takes a tile of BLOCK_M rows through every layer and back, and nothing but the input,
the target and the gradients touches DRAM:

- forward: ``h = act(h @ W_l^T + b_l)`` layer after layer on a (BLOCK_M, D) tile, D the
  widest layer rounded up to a power of two (zero padding keeps padded columns at 0).
  Each layer's output goes to the program's own scratch tiles, reused for every row tile,
  so they stay in L1/L2 (Triton has no explicit shared memory), for the next layer and
  for the backward's ReLU masks; the network's output also stays in registers for the loss;
- loss: ``d = out - y``, the tile's sum of squares, ``g = 2 d / (rows * outputs)``;
- backward, from the last layer: the ReLU mask on g, ``db_l += colsum(g)``,
  ``dW_l += g^T @ h_l`` into this program's row of a partial-gradient buffer, then
  ``g = g @ W_l`` for the layer below.

The products loop over K in chunks of BLOCK_K rather than unrolling a (rows, D) x (D, D)
product: float32 IEEE products run on the FMA units, and unrolled they took ptxas minutes
to compile per configuration.

Programs are persistent (a fixed number, each looping over row tiles), so the partial
buffer is (programs, parameters) whatever the batch; a second kernel adds its rows in
program order, in place into row 0, which holds the gradients and the loss. No float
atomics: the same bits on every run with one configuration (autotuning, which picks by
timing, may choose another tile shape in another process, and so another order). A batch of up to 64 rows is one program's alone, and
needs no second kernel.

The optimizer step is not here: the engine hands the flat gradient's views to the
multi-tensor Adam. Used by :mod:`aiaas_fast.engine_cuda` (captured in its CUDA graph);
not an operator of its own.

Precision: float32 in and out, float32 accumulation; the products follow torch's TF32
setting for CUDA matmuls as torch.mm does (IEEE float32 by default).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from .._tf32 import cuda_matmul_allows_tf32
from ._common import INTERPRET, autotuning, on_device

#: Widest layer (inputs and outputs included) the kernel takes: tiles of 128x128 float32
#: weights are what registers and shared memory hold.
MAX_WIDTH = 128
_ALIGN = 4  # gradient segments start on 16 bytes, for the vectorised Adam kernels
_ONE_PROGRAM_ROWS = 64  # up to this batch, one program takes every tile (see FusedMLP._launch)


def _configs():
    if not autotuning():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    # Float32 FMA products hold both operands and the (D, D) weight-gradient accumulator in
    # registers: ptxas -v for sm_90 (2026-11-29) shows no spills at D <= 64 with these, and
    # spills at D = 128 that 16 warps (128 registers each) roughly halve.
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=2)
            for m, k, w in ((32, 16, 4), (32, 16, 8), (64, 16, 8), (32, 16, 16))]


#: Rows of the scratch tiles reserved per program: the largest BLOCK_M of any configuration.
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in _configs())


def _prune(configs, named_args, **kwargs):
    # A (BLOCK_M, 128) float32 activation tile is 16 KB at 32 rows; 16 warps only for D = 128.
    d = kwargs.get("D", named_args.get("D", 0))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * d <= 64 * 128 and (c.num_warps < 16 or d >= 128)]
    return kept or configs[:1]


@triton.jit
def _dot_chunks(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, n_rows, n_k, n_cols,
                ROWS: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """A[ROWS, K] @ B[K, D] in chunks of BLOCK_K along K (a loop, not unrolled: the compiled
    kernel stays small), zero outside (n_rows, n_k, n_cols)."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, D)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((ROWS, D), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        kk = k0 + k
        a = tl.load(a_ptr + r[:, None].to(tl.int64) * stride_am + kk[None, :] * stride_ak,
                    mask=(r[:, None] < n_rows) & (kk[None, :] < n_k), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + c[None, :] * stride_bn,
                    mask=(kk[:, None] < n_k) & (c[None, :] < n_cols), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _relu_keep(relu_ptr, l, out):
    """Where layer l's gradient passes: everywhere without ReLU, else where its output is not
    <= 0 (a NaN passes, as torch's threshold_backward lets it)."""
    return (tl.load(relu_ptr + l) == 0) | ~(out <= 0)


# Tuned per rows bucket, width, depth, pass and precision; Triton adds the dtypes itself.
# Not specialized on the depth, row count, autotuning key and sizes (a large kernel: each class
# of value, 1, a multiple of 16 or other, would compile it again); the strides are.
@triton.autotune(configs=_configs(), key=["M_KEY", "D", "L", "TRAIN", "HAS_BIAS", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["L", "M", "M_KEY", "S", "scratch_stride"])
def _mlp_kernel(
    x_ptr, y_ptr, out_ptr, w_addr_ptr, b_addr_ptr, dims_ptr, relu_ptr, goff_ptr, scratch_ptr, part_ptr,
    L, M, M_KEY, S, scratch_stride, stride_xm, stride_xk, stride_ym, stride_yn, stride_om, stride_on, grad_scale,
    loss_scale, D: tl.constexpr, HAS_BIAS: tl.constexpr, TRAIN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, D)
    tile_rows = tl.arange(0, BLOCK_M)
    tile_offs = tile_rows[:, None] * D + cols[None, :]
    n_y = tl.load(dims_ptr + L)
    part = part_ptr + pid.to(tl.int64) * S
    # This program's scratch, (BLOCK_M, D) row-major slots: slot l holds layer l's output,
    # slot L the gradient being propagated. Layers run in a loop, not unrolled: the
    # kernel is compiled once per padded width D whatever the depth.
    scratch = scratch_ptr + pid.to(tl.int64) * scratch_stride
    g_slot = scratch + L * BLOCK_M * D
    if TRAIN:  # this program's partial gradients start at zero
        for s0 in range(0, S, 1024):
            offs = s0 + tl.arange(0, 1024)
            tl.store(part + offs, tl.zeros((1024,), dtype=tl.float32), mask=offs < S)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        # Scratch and partial rows are shared by the program's threads, which map them
        # differently from one use to the next: a barrier between writing and reading.
        tl.debug_barrier()
        row0 = tile * BLOCK_M
        rows = row0 + tile_rows
        row_ok = rows < M
        n_rows = tl.minimum(M - row0, BLOCK_M)
        x_tile = x_ptr + row0.to(tl.int64) * stride_xm

        # Forward. W_l (n_out, n_in) row-major, so W_l^T's element (k, n) is at n * n_in + k.
        n_in = tl.load(dims_ptr)
        n_out = tl.load(dims_ptr + 1)
        h = _dot_chunks(x_tile, stride_xm, stride_xk, tl.load(w_addr_ptr).to(tl.pointer_type(tl.float32)), 1, n_in,
                        n_rows, n_in, n_out, BLOCK_M, D, BLOCK_K, PRECISION)
        for l in range(0, L):
            if l > 0:
                n_in = tl.load(dims_ptr + l)
                n_out = tl.load(dims_ptr + l + 1)
                w = tl.load(w_addr_ptr + l).to(tl.pointer_type(tl.float32))
                h = _dot_chunks(scratch + (l - 1) * BLOCK_M * D, D, 1, w, 1, n_in, BLOCK_M, n_in, n_out,
                                BLOCK_M, D, BLOCK_K, PRECISION)
            if HAS_BIAS:
                b = tl.load(b_addr_ptr + l).to(tl.pointer_type(tl.float32))
                h += tl.load(b + cols, mask=cols < n_out, other=0.0)[None, :]
            h = tl.where((tl.load(relu_ptr + l) != 0) & (h < 0), 0.0, h)  # NaN stays NaN, as torch.relu
            if TRAIN:
                tl.store(scratch + l * BLOCK_M * D + tile_offs, h)
            elif l < L - 1:
                tl.store(scratch + l * BLOCK_M * D + tile_offs, h)
            tl.debug_barrier()

        y_ok = row_ok[:, None] & (cols[None, :] < n_y)
        if not TRAIN:
            tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on, h, mask=y_ok)
        else:
            y = tl.load(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn, mask=y_ok, other=0.0)
            d = tl.where(y_ok, h - y, 0.0)
            loss += tl.sum(d * d, axis=1)
            g = d * grad_scale
            # Backward, from the last layer down to layer 1; layer 0 (input x) after the loop.
            for i in range(0, L):
                l = L - 1 - i
                n_in = tl.load(dims_ptr + l)
                n_out = tl.load(dims_ptr + l + 1)
                g = tl.where(_relu_keep(relu_ptr, l, tl.load(scratch + l * BLOCK_M * D + tile_offs)), g, 0.0)
                if HAS_BIAS:
                    gb_ptrs = part + tl.load(goff_ptr + 2 * l + 1) + cols
                    tl.store(gb_ptrs, tl.load(gb_ptrs, mask=cols < n_out, other=0.0) + tl.sum(g, axis=0),
                             mask=cols < n_out)
                tl.debug_barrier()  # the reads of the gradient slot by the layer above are done
                tl.store(g_slot + tile_offs, g)
                tl.debug_barrier()
                # dW_l (n_out, n_in) += g^T @ a, a this layer's input, summed over the tile's rows
                if l == 0:
                    gw = _dot_chunks(g_slot, 1, D, x_tile, stride_xm, stride_xk, n_out, n_rows, n_in,
                                     D, D, BLOCK_K, PRECISION)
                else:
                    gw = _dot_chunks(g_slot, 1, D, scratch + (l - 1) * BLOCK_M * D, D, 1, n_out, BLOCK_M, n_in,
                                     D, D, BLOCK_K, PRECISION)
                gw_ptrs = part + tl.load(goff_ptr + 2 * l) + cols[:, None] * n_in + cols[None, :]
                gw_ok = (cols[:, None] < n_out) & (cols[None, :] < n_in)
                tl.store(gw_ptrs, tl.load(gw_ptrs, mask=gw_ok, other=0.0) + gw, mask=gw_ok)
                if l > 0:  # the gradient for the layer below: g @ W_l, W_l (n_out, n_in) as stored
                    w = tl.load(w_addr_ptr + l).to(tl.pointer_type(tl.float32))
                    g = _dot_chunks(g_slot, D, 1, w, n_in, 1, BLOCK_M, n_out, n_in, BLOCK_M, D, BLOCK_K, PRECISION)
    if TRAIN:
        tl.store(part + S - 1, tl.sum(loss, axis=0) * loss_scale)  # the mean's share: summed, it is the mean


@triton.jit
def _sum_rows_kernel(part_ptr, programs, S, BLOCK: tl.constexpr):
    """part[0, s] = sum over p of part[p, s], p in order (in place: each element is read,
    then written, by one thread)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, programs):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += S  # pointer arithmetic is 64-bit: no overflow on large buffers
    tl.store(part_ptr + offs, acc, mask=ok)


def unsupported_reason(layers: Sequence[Tuple[nn.Linear, bool]]) -> Optional[str]:
    """Why the fused kernel cannot train these layers (None: it can)."""
    widths = [layers[0][0].in_features] + [lin.out_features for lin, _ in layers]
    if max(widths) > MAX_WIDTH:
        return f"the fused MLP kernel takes widths up to {MAX_WIDTH}; this model has {max(widths)}"
    if min(widths) < 1:
        return "the fused MLP kernel needs layers of width >= 1"
    biases = {lin.bias is not None for lin, _ in layers}
    if len(biases) > 1:
        return "the fused MLP kernel needs a bias on every layer or on none"
    for lin, _ in layers:
        for p in (lin.weight, lin.bias):
            if p is not None and (p.dtype != torch.float32 or not p.is_contiguous()):
                return "the fused MLP kernel takes contiguous float32 parameters"
    device = layers[0][0].weight.device.type
    if device != ("cpu" if INTERPRET else "cuda"):
        return f"the fused MLP kernel runs on {'cpu (TRITON_INTERPRET=1)' if INTERPRET else 'cuda'}, not {device}"
    return None


def _addressable(t: Tensor) -> bool:
    """Whether the kernel can address (rows, cols) t in place: within a tile it forms a column
    index (under 128) times the column stride, and for the weight gradients a row index within
    the tile times the row stride, in 32-bit arithmetic (a column-major view of more than
    16.7M rows would overflow)."""
    rows_in_tile = min(t.shape[0], _MAX_BLOCK_M)
    return max(t.stride(1) * max(t.shape[1] - 1, 0), t.stride(0) * max(rows_in_tile - 1, 0)) < 2**31


def _in_place_or_copied(t: Tensor) -> Tensor:
    return t if _addressable(t) else t.contiguous()


def _precision() -> str:
    return "tf32" if cuda_matmul_allows_tf32() else "ieee"


class FusedMLP:
    """The tables and buffers the kernels need for one model's layers (built once; the
    kernels read the parameters through their addresses, so the tensors must stay put)."""

    def __init__(self, layers: Sequence[Tuple[nn.Linear, bool]], programs: Optional[int] = None):
        why = unsupported_reason(layers)
        if why:
            raise ValueError(why)
        device = layers[0][0].weight.device
        self.widths = [layers[0][0].in_features] + [lin.out_features for lin, _ in layers]
        self.L = len(layers)
        self.D = max(16, triton.next_power_of_2(max(self.widths)))  # tl.dot needs 16
        self.has_bias = layers[0][0].bias is not None
        self.params: List[Tensor] = [p for lin, _ in layers for p in (lin.weight, lin.bias) if p is not None]
        offsets, goff, at = [], [], 0
        for p in self.params:
            offsets.append(at)
            at += -(-p.numel() // _ALIGN) * _ALIGN
        self.S = at + 1  # the last slot: the sum of squared errors
        per_layer = 2 if self.has_bias else 1
        for i in range(self.L):
            goff += [offsets[per_layer * i], offsets[per_layer * i + 1] if self.has_bias else 0]
        as_table = lambda values, dtype: torch.tensor(values, dtype=dtype).to(device)
        self._w = as_table([lin.weight.data_ptr() for lin, _ in layers], torch.int64)
        self._b = as_table([lin.bias.data_ptr() if self.has_bias else 0 for lin, _ in layers], torch.int64)
        self._dims = as_table(self.widths, torch.int32)
        self._relu = as_table([int(relu) for _, relu in layers], torch.int32)
        self._goff = as_table(goff, torch.int64)
        if programs is None:
            programs = 4 if INTERPRET else 2 * torch.cuda.get_device_properties(device).multi_processor_count
        self.programs = programs
        self._offsets = offsets
        scratch_stride = (self.L + 1) * _MAX_BLOCK_M * self.D  # each layer's output and the gradient
        self._bind(torch.empty((programs, self.S), dtype=torch.float32, device=device),
                   torch.empty(programs * scratch_stride, dtype=torch.float32, device=device))

    def _bind(self, part: Tensor, scratch: Tensor) -> None:
        """Uses these buffers (tests pass views into larger, guarded ones)."""
        self._part, self._scratch = part, scratch
        #: The step's output: row 0 of the partial buffer, where the programs' rows are summed
        #: (or the only row, for a batch one program takes alone): gradients, then the loss.
        self.flat = part[0]
        #: Each parameter's gradient: a view of :attr:`flat`.
        self.grads = [self.flat[o:o + p.numel()].view(p.shape) for o, p in zip(self._offsets, self.params)]

    def _launch(self, x: Tensor, y: Optional[Tensor], out: Optional[Tensor], train: bool) -> int:
        """Launches the kernel; returns the number of programs (rows of the partial buffer)."""
        x = _in_place_or_copied(x)
        y = None if y is None else _in_place_or_copied(y)
        M = x.shape[0]
        y_ = y if y is not None else x
        out_ = out if out is not None else x
        # No more programs than tiles of the smallest BLOCK_M, nor than the buffers hold; one
        # alone for a small batch, which then needs no second kernel to sum the programs' rows
        # (a step of the seed network is latency: every kernel counts). Training: each program
        # zeroes its partial row, so all of the grid's rows are valid.
        programs = 1 if M <= _ONE_PROGRAM_ROWS else min(self.programs, triton.cdiv(M, 16))
        grid = (programs,) if train else (lambda meta: (min(programs, triton.cdiv(M, meta["BLOCK_M"])),))
        with on_device(x):
            _mlp_kernel[grid](
                x, y_, out_, self._w, self._b, self._dims, self._relu, self._goff, self._scratch, self._part,
                self.L, M, 1 << max(0, M - 1).bit_length(), self.S, self._scratch.numel() // self.programs,
                x.stride(0), x.stride(1), y_.stride(0), y_.stride(1), out_.stride(0), out_.stride(1),
                2.0 / (M * self.widths[-1]), 1.0 / (M * self.widths[-1]),
                D=self.D, HAS_BIAS=self.has_bias, TRAIN=train, PRECISION=_precision())
        return programs

    def loss_and_grads(self, x: Tensor, y: Tensor) -> Tensor:
        """One pass: the mean squared error of the model on (x, y) and its gradients, written
        into :attr:`flat` (:attr:`grads` are views of it); returns the loss as a 0-dim view of
        it, valid until the next call. No host synchronisation (capturable)."""
        if x.shape[0] == 0:
            raise ValueError("aiaas_fast fused MLP: a training step needs at least one row")
        programs = self._launch(x, y, None, True)
        if programs > 1:
            block = 1024
            with on_device(x):
                _sum_rows_kernel[(triton.cdiv(self.S, block),)](self._part, programs, self.S, BLOCK=block)
        return self.flat[self.S - 1]

    def forward(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The model's output for x (rows, in), written into ``out`` (rows, out) if given."""
        if out is None or not _addressable(out):
            result = torch.empty((x.shape[0], self.widths[-1]), dtype=torch.float32, device=x.device)
        else:
            result = out
        if x.shape[0]:
            self._launch(x, None, result, False)
        if out is not None and result is not out:
            out.copy_(result)
            return out
        return result
