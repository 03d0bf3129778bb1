"""Shared inputs and tolerances for the op tests: fresh random tensors, odd sizes,
non-contiguous views, and a tolerance per dtype."""
from __future__ import annotations

import torch

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


def rand(*shape, dtype=torch.float32, contiguous=True, requires_grad=False, scale=1.0, generator=None):
    """Fresh random normal values; when ``contiguous`` is False, a strided view into a
    larger buffer (every other element of a transposed buffer) with the same values
    semantics, so kernels see real strides."""
    if contiguous or len(shape) == 0:
        t = torch.randn(tuple(shape), dtype=torch.float64, generator=generator) * scale
    else:
        big = torch.randn(tuple(reversed([2 * s for s in shape])), dtype=torch.float64, generator=generator) * scale
        t = big.permute(*reversed(range(len(shape))))[tuple(slice(None, None, 2) for _ in shape)]
        assert tuple(t.shape) == tuple(shape) and (t.numel() <= 1 or not t.is_contiguous())
    t = t.to(dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def assert_close(actual, expected, dtype, msg=""):
    expected = expected.to(actual.dtype) if actual.dtype != expected.dtype else expected
    torch.testing.assert_close(actual, expected, **tol(dtype), equal_nan=True, msg=msg or None)
