"""The Adam (AdamW) update as one Triton launch per parameter group.

The group is cut into blocks of BLOCK elements across all its tensors; a table on the
device gives each program its tensor and block, and per tensor the addresses of param,
grad and state and the step's scalars, so one launch updates every tensor whatever their
number and sizes. Each element of param and state is read and written once, in float32.
Parameters may be float32, bfloat16 or float16, their state float32 (recommended for
16-bit parameters) or the parameters' dtype (as ``torch.optim.Adam`` keeps it).

Registered as an opaque ``torch.library.custom_op`` (``torch.ops.aiaas_fast.triton_adam_``),
not a ``triton_op``: the kernel reaches its tensors through a table of raw addresses, which
a traced graph cannot follow, so ``torch.compile`` keeps the whole update as one node
(``fullgraph=True`` traces through it without a break).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import DTYPES, check_device, on_device

OP = "aiaas_fast.adam_"
BLOCK = 2048
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _typed(address, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """The table's address as a pointer of the tensor's type. ALIGNED (every address 16-byte
    aligned, checked by the caller): said here, on the cast itself, as a hint set on a
    function's result would be lost when the call is inlined; it lets the accesses be vectors."""
    if CODE == 1:
        ptr = address.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 2:
        ptr = address.to(tl.pointer_type(tl.float16))
    else:
        ptr = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, ok, FULL: tl.constexpr):
    if FULL:
        return tl.load(ptr + offs).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, value, ok, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, offs, ok, step_size, inv_bc2_sqrt, beta2, one_minus_beta2,
            lerp_weight, eps, weight_decay, decay, sign, WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr,
            LERP_LOW: tl.constexpr, FULL: tl.constexpr):
    g = _load(g_ptr, offs, ok, FULL) * sign
    w = _load(p_ptr, offs, ok, FULL)
    if WD_MODE == 1:
        g = g + weight_decay * w
    elif WD_MODE == 2:
        w = w * decay
    m = _load(m_ptr, offs, ok, FULL)
    if LERP_LOW:  # ATen's lerp switches form at weight 0.5; the same rounding as torch.optim.Adam
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_weight)
    v = _load(v_ptr, offs, ok, FULL) * beta2 + one_minus_beta2 * g * g
    vmax = v
    if AMSGRAD:
        old = _load(x_ptr, offs, ok, FULL)
        vmax = tl.where((old != old) | (old > v), old, v)  # torch.maximum: NaN wins
        _store(x_ptr, offs, vmax, ok, FULL)
    # Correctly rounded sqrt and division, as torch's: the defaults compile to approximate,
    # denormal-flushing instructions (with eps = 0 a tiny v would flush to 0 and divide by it).
    denom = tl.sqrt_rn(vmax) * inv_bc2_sqrt + eps
    w = w - step_size * tl.div_rn(m, denom)
    _store(m_ptr, offs, m, ok, FULL)
    _store(v_ptr, offs, v, ok, FULL)
    _store(p_ptr, offs, w, ok, FULL)


@triton.jit
def _adam_kernel(addr_ptr, numel_ptr, scalar_ptr, blk_tensor_ptr, blk_index_ptr, T,
                 beta2, one_minus_beta2, lerp_weight, eps, weight_decay, decay, sign,
                 P_CODE: tl.constexpr, S_CODE: tl.constexpr, WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr,
                 LERP_LOW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(blk_tensor_ptr + pid)
    start = tl.load(blk_index_ptr + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + i)
    ok = offs < numel
    p_ptr = _typed(tl.load(addr_ptr + i), P_CODE, ALIGNED)
    g_ptr = _typed(tl.load(addr_ptr + T + i), P_CODE, ALIGNED)
    m_ptr = _typed(tl.load(addr_ptr + 2 * T + i), S_CODE, ALIGNED)
    v_ptr = _typed(tl.load(addr_ptr + 3 * T + i), S_CODE, ALIGNED)
    x_ptr = m_ptr
    if AMSGRAD:
        x_ptr = _typed(tl.load(addr_ptr + 4 * T + i), S_CODE, ALIGNED)
    step_size = tl.load(scalar_ptr + i)          # lr / (1 - beta1^t)
    inv_bc2_sqrt = tl.load(scalar_ptr + T + i)   # 1 / sqrt(1 - beta2^t)
    # A block wholly inside its tensor needs no mask (a mask of unknown alignment would keep
    # the accesses scalar); only each tensor's last block is masked.
    if start + BLOCK <= numel:
        _update(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, offs, ok, step_size, inv_bc2_sqrt, beta2, one_minus_beta2,
                lerp_weight, eps, weight_decay, decay, sign, WD_MODE, AMSGRAD, LERP_LOW, True)
    else:
        _update(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, offs, ok, step_size, inv_bc2_sqrt, beta2, one_minus_beta2,
                lerp_weight, eps, weight_decay, decay, sign, WD_MODE, AMSGRAD, LERP_LOW, False)


_block_tables: Dict[Tuple, Tuple[Tensor, Tensor]] = {}


def _block_table(numels: Tuple[int, ...], device: torch.device) -> Tuple[Tensor, Tensor]:
    """(tensor index, block index within the tensor) of every program; cached per group shape."""
    key = (numels, str(device))
    table = _block_tables.get(key)
    if table is None:
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
        starts = torch.cumsum(counts, 0) - counts
        index = torch.arange(tensor.numel(), dtype=torch.int32) - torch.repeat_interleave(starts, counts).to(torch.int32)
        if len(_block_tables) > 64:
            _block_tables.clear()
        table = _block_tables[key] = (tensor.to(device), index.to(device))
    return table


def _step(steps: List[Tensor]) -> List[float]:
    """Every step incremented, then read: a step tensor shared by params counts once per param
    and all of them read the final count, as torch's multi-tensor Adam and the other backends."""
    for s in steps:
        s.add_(1)
    return [s.item() for s in steps]


@torch.library.custom_op("aiaas_fast::triton_adam_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
def triton_adam_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, beta1: float, beta2: float,
                 weight_decay: float, eps: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool) -> None:
    _checks.adam_hyperparameters(lr, beta1, beta2, weight_decay, eps)
    _checks.adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, DTYPES, "triton",
                         state_dtypes=(torch.float32,))
    if not params:
        return
    check_device(OP, params[0])
    if params[0].is_cuda:
        with on_device(params[0]):
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{OP} (triton backend): cannot be captured in a CUDA graph: each call reads its "
                                   "steps and copies its tables from the host. The native backend's adam_ with "
                                   "steps on the device can be captured")
    state_dtype = exp_avgs[0].dtype
    states = [*exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else [])]
    for t in states:
        if t.dtype != state_dtype:
            raise RuntimeError(f"{OP} (triton backend): every state tensor of a group must have one dtype, got "
                               f"{t.dtype} and exp_avgs[0].dtype={state_dtype}")
    # Non-contiguous tensors are updated through contiguous copies, written back at the end.
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs) if amsgrad else []]
    copied = []
    for i in range(len(params)):
        group = [lst[i] for lst in lists if lst]
        if not all(t.is_contiguous() for t in group):
            for lst in lists:
                if lst:
                    lst[i] = lst[i].contiguous()
            copied.append(i)

    ts = [float(t) for t in _step(list(state_steps))]
    scalars = [[lr / (1 - beta1**t) for t in ts], [1.0 / math.sqrt(1 - beta2**t) for t in ts]]
    keep = [i for i, p in enumerate(lists[0]) if p.numel() > 0]
    if keep:
        device = params[0].device
        pick = lambda lst: [lst[i] for i in keep] if lst else []
        addrs = [t.data_ptr() for lst in lists for t in pick(lst)]
        T = len(keep)
        addr = torch.tensor(addrs, dtype=torch.int64).to(device, non_blocking=True)
        numel = torch.tensor([lists[0][i].numel() for i in keep], dtype=torch.int64).to(device, non_blocking=True)
        scal = torch.tensor([[row[i] for i in keep] for row in scalars], dtype=torch.float32).to(device, non_blocking=True)
        blk_tensor, blk_index = _block_table(tuple(lists[0][i].numel() for i in keep), device)
        wd_mode = 0 if weight_decay == 0 else (2 if decoupled_weight_decay else 1)
        with on_device(params[0]):
            _adam_kernel[(blk_tensor.numel(),)](
                addr, numel, scal, blk_tensor, blk_index, T,
                beta2, 1 - beta2, 1 - beta1, eps, weight_decay, 1 - lr * weight_decay, -1.0 if maximize else 1.0,
                P_CODE=_CODES[params[0].dtype], S_CODE=_CODES[state_dtype], WD_MODE=wd_mode, AMSGRAD=amsgrad,
                LERP_LOW=(1 - beta1) < 0.5, ALIGNED=all(a % 16 == 0 for a in addrs), BLOCK=BLOCK, num_warps=4)
    for i in copied:
        for src, dst in zip(lists, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)):
            if src and dst is not grads:
                dst[i].copy_(src[i])


@triton_adam_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
      amsgrad, maximize, decoupled_weight_decay):
    return None
