"""Whether float32 products on CUDA may use TF32, as torch.mm decides it, for the kernels
that follow torch's setting (the Triton products, the fused MLP) and the CUDA graphs that
freeze it at capture."""
from __future__ import annotations

import torch


def cuda_matmul_allows_tf32() -> bool:
    """torch.backends.cuda.matmul's TF32 setting, read through the newer ``fp32_precision``
    where torch has it: once a program sets that (``torch.backends.cuda.matmul.fp32_precision
    = "tf32"``, as some libraries do), reading the older ``allow_tf32`` raises ("mix of the
    legacy and new APIs"). The older setters (``allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high")``) show in ``fp32_precision`` too."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch before 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":  # not set for matmul: torch's global setting, else the default (IEEE)
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"
