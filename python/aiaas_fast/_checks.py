"""Argument checks for the Python backends (reference, Triton) and the fake kernels, with
the messages of ``csrc/ops/checks.cpp``: the op, the argument, the shape, dtype and device.

``torch._check`` raises a plain RuntimeError in eager mode and also works on fake and
symbolic tensors while ``torch.compile`` traces."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def dtype_supported(op: str, name: str, t: Tensor, dtypes=ALL_DTYPES, backend: Optional[str] = None) -> None:
    where = f" ({backend} backend)" if backend else ""
    torch._check(t.dtype in dtypes, lambda: f"{op}{where}: supports {_names(dtypes)}, got {name}.dtype={t.dtype}"
                 + ("; the native and reference backends support float64" if backend == "triton" else ""))


def same_dtype_device(op: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    torch._check(a.dtype == b.dtype, lambda: f"{op}: {name_a} and {name_b} must have the same dtype, got {name_a}.dtype={a.dtype} and {name_b}.dtype={b.dtype}")
    torch._check(a.device == b.device, lambda: f"{op}: {name_a} and {name_b} must be on the same device, got {name_a} on {a.device} and {name_b} on {b.device}")


def linear_relu_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], dtypes=ALL_DTYPES, backend=None) -> None:
    op = "aiaas_fast.linear_relu"
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D (out_features, in_features), got shape {list(weight.shape)}")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension (..., in_features), got a 0-dim tensor")
    dtype_supported(op, "x", x, dtypes, backend)
    same_dtype_device(op, "x", x, "weight", weight)
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"{op}: x has {x.shape[-1]} features (shape {list(x.shape)}) but weight expects {weight.shape[1]} (shape {list(weight.shape)})")
    if bias is not None:
        same_dtype_device(op, "x", x, "bias", bias)
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0], lambda: f"{op}: bias must have shape [{weight.shape[0]}] (out_features), got shape {list(bias.shape)}")


def linear_relu_backward_args(grad_out: Tensor, x: Tensor, weight: Tensor, out: Tensor, dtypes=ALL_DTYPES, backend=None) -> None:
    op = "aiaas_fast.linear_relu_backward"
    linear_relu_args(x, weight, None, dtypes, backend)
    same_dtype_device(op, "grad_out", grad_out, "x", x)
    same_dtype_device(op, "out", out, "x", x)
    expected = [*x.shape[:-1], weight.shape[0]]
    torch._check(list(out.shape) == expected, lambda: f"{op}: out must have shape {expected} (x's shape with out_features last), got {list(out.shape)}")
    torch._check(grad_out.shape == out.shape, lambda: f"{op}: grad_out must have the shape of out {list(out.shape)}, got {list(grad_out.shape)}")


def reduction(op: str, value: str) -> None:
    torch._check_value(value in ("none", "mean", "sum"), lambda: f"{op}: reduction must be 'none', 'mean' or 'sum', got '{value}'")


def mse_loss_args(input: Tensor, target: Tensor, dtypes=ALL_DTYPES, backend=None) -> torch.Size:
    """Checks the arguments and returns the broadcast shape."""
    op = "aiaas_fast.mse_loss"
    dtype_supported(op, "input", input, dtypes, backend)
    same_dtype_device(op, "input", input, "target", target)
    try:
        return torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise RuntimeError(f"{op}: input and target shapes are incompatible: input {list(input.shape)}, target {list(target.shape)}") from None


def adam_hyperparameters(lr: float, beta1: float, beta2: float, weight_decay: float, eps: float) -> None:
    import math

    op = "aiaas_fast.adam_"
    fmt = lambda v: f"{v:g}"  # as C++ prints doubles: 1, not 1.0
    if not (math.isfinite(lr) and lr >= 0):
        raise RuntimeError(f"{op}: invalid learning rate lr={fmt(lr)} (must be finite and >= 0)")
    if not (math.isfinite(eps) and eps >= 0):
        raise RuntimeError(f"{op}: invalid eps={fmt(eps)} (must be finite and >= 0)")
    if not (0 <= beta1 < 1):
        raise RuntimeError(f"{op}: invalid beta1={fmt(beta1)} (must be in [0, 1))")
    if not (0 <= beta2 < 1):
        raise RuntimeError(f"{op}: invalid beta2={fmt(beta2)} (must be in [0, 1))")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise RuntimeError(f"{op}: invalid weight_decay={fmt(weight_decay)} (must be finite and >= 0)")


def adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad: bool,
                 dtypes=ALL_DTYPES, backend=None, state_dtypes=None) -> None:
    """``state_dtypes``: the dtypes the state tensors may have besides the params' own
    (the Triton kernel also keeps float32 state for 16-bit params)."""
    op = "aiaas_fast.adam_"
    n = len(params)
    if not (len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n and len(state_steps) == n):
        raise RuntimeError(f"{op}: params, grads, exp_avgs, exp_avg_sqs and state_steps must have one entry per parameter, "
                           f"got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)} and {len(state_steps)}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise RuntimeError(f"{op}: amsgrad needs one max_exp_avg_sq per parameter, got {len(max_exp_avg_sqs)} for {n} params")
    where = f" ({backend} backend)" if backend else ""
    for i, p in enumerate(params):
        if p.dtype not in dtypes:
            raise RuntimeError(f"{op}{where}: supports {_names(dtypes)} params, got params[{i}].dtype={p.dtype}")
        if p.dtype != params[0].dtype or p.device != params[0].device:
            raise RuntimeError(f"{op}: params[{i}] is {p.dtype} on {p.device} but params[0] is {params[0].dtype} on "
                               f"{params[0].device}; call once per (device, dtype) group")
        lists = [("grads", grads[i], False), ("exp_avgs", exp_avgs[i], True), ("exp_avg_sqs", exp_avg_sqs[i], True)]
        if amsgrad:
            lists.append(("max_exp_avg_sqs", max_exp_avg_sqs[i], True))
        for name, t, is_state in lists:
            if t.shape != p.shape:
                raise RuntimeError(f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] has shape {list(p.shape)}")
            allowed = {p.dtype, *(state_dtypes or ())} if is_state else {p.dtype}
            if t.dtype not in allowed:
                raise RuntimeError(f"{op}: {name}[{i}].dtype={t.dtype} but params[{i}].dtype={p.dtype}")
            if t.device != p.device:
                raise RuntimeError(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
        s = state_steps[i]
        if s.numel() != 1 or not s.is_floating_point():
            raise RuntimeError(f"{op}: state_steps[{i}] must be a one-element floating-point tensor, got {s.dtype} of shape {list(s.shape)}")
