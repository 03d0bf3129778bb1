"""Shared inputs and tolerances for the op tests: fresh random tensors, odd sizes,
non-contiguous views, and a tolerance per dtype."""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Optional

import pytest
import torch
from torch import nn

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (rtol, atol) against a float64 reference computed from the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


class Backend(NamedTuple):
    name: str
    device: str

    @property
    def dtypes(self):
        """The dtypes this backend's kernels take (Triton: no float64)."""
        return [d for d in DTYPES if d != torch.float64] if self.name == "triton" else DTYPES

    def supports(self, dtype) -> bool:
        return dtype in self.dtypes


_CUDA = torch.cuda.is_available()
BACKENDS = [Backend("native", "cpu"), Backend("reference", "cpu")]
if _CUDA:
    BACKENDS += [Backend("native", "cuda"), Backend("reference", "cuda"), Backend("triton", "cuda")]
else:
    BACKENDS += [Backend("triton", "cpu")]
# AIAAS_FAST_TEST_DEVICES=cuda: the backend-parametrized op tests on those devices only
# (scripts/gpu_check.sh: its minutes on the GPU are not spent on what CI tests on the CPU).
_DEVICES = [d for d in os.environ.get("AIAAS_FAST_TEST_DEVICES", "").split(",") if d]
if _DEVICES:
    BACKENDS = [b for b in BACKENDS if b.device in _DEVICES]


def backend_skip_reason(b: Backend) -> Optional[str]:
    if b.name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if b.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on the CPU needs TRITON_INTERPRET=1"
    if b.name == "native" and b.device == "cuda":
        from aiaas_fast.backend import native_supports

        if not native_supports("cuda"):
            return "this build has no native CUDA kernels"
    return None


def triton_interpreter_reason() -> Optional[str]:
    """Why Triton kernels cannot run on CPU tensors here (None: they can, interpreted)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton on the CPU needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)"
    return None


needs_triton_interpreter = pytest.mark.skipif(triton_interpreter_reason() is not None,
                                              reason=str(triton_interpreter_reason()))


def rand(*shape, dtype=torch.float32, contiguous=True, requires_grad=False, scale=1.0, generator=None, device="cpu"):
    """Fresh random normal values; when ``contiguous`` is False, a strided view into a
    larger buffer (every other element of a transposed buffer) with the same values
    semantics, so kernels see real strides."""
    if contiguous or len(shape) == 0:
        t = torch.randn(tuple(shape), dtype=torch.float64, generator=generator) * scale
    else:
        # Rounded to dtype before the view is taken: .to() of a strided view makes it contiguous.
        big = (torch.randn(tuple(reversed([2 * s for s in shape])), dtype=torch.float64, generator=generator) * scale).to(dtype)
        t = big.permute(*reversed(range(len(shape))))[tuple(slice(None, None, 2) for _ in shape)]
        assert tuple(t.shape) == tuple(shape) and (t.numel() <= 1 or not t.is_contiguous())
    t = t.to(dtype)
    if device != "cpu":
        t = t.to(device) if contiguous or len(shape) == 0 else _strided_on(t, device)
    if requires_grad:
        t.requires_grad_(True)
    return t


# The Triton kernels' float32 products run in another order (tiles of K on the GPU; IEEE
# float32, not TF32, unless torch.backends.cuda.matmul.allow_tf32 is set): a looser float32 bound.
TRITON_TOLERANCES = {**TOLERANCES, torch.float32: (1e-4, 1e-4)}


def assert_close(actual, expected, dtype, msg="", backend=None, scaled_by=1):
    """Within the dtype's tolerances. ``scaled_by``: both sides were multiplied by this (a
    mean's gradient times n), so the absolute floor grows by that many of the dtype's
    smallest subnormal steps (which a float16 value near zero is rounded to)."""
    expected = expected.to(device=actual.device, dtype=actual.dtype)
    rtol, atol = (TRITON_TOLERANCES if backend is not None and backend.name == "triton" else TOLERANCES)[dtype]
    if scaled_by != 1 and dtype.is_floating_point:
        info = torch.finfo(dtype)
        atol += scaled_by * info.smallest_normal * info.eps
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=msg or None)


def _strided_on(t, device):
    """The same values as a non-contiguous view on ``device``."""
    big = torch.empty(tuple(2 * s for s in t.shape), dtype=t.dtype, device=device)
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


# ---- the training engine's tests: a Linear/ReLU network and plain PyTorch training steps
def sequential(widths, final_relu=False, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2 or final_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device)


def torch_steps(model, batches, opt):
    """Plain PyTorch steps (MSE, the optimizer given) over the batches; returns the losses."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
