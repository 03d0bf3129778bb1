"""What the three Triton op files share: how a kernel is launched and an op registered,
in compiled mode (GPU) and under Triton's interpreter (CPU, tests)."""
from __future__ import annotations

import contextlib
import os

import torch

#: Read once, as ``triton.jit`` reads it when our kernels are decorated (at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: What the Triton kernels take: 16- and 32-bit floats (no float64: use native or reference).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autotuning() -> bool:
    """Full autotuning on a GPU; one configuration under the interpreter, or when
    ``AIAAS_FAST_TRITON_AUTOTUNE=0`` (the GPU test run: many shapes, each would be tuned)."""
    return not INTERPRET and os.environ.get("AIAAS_FAST_TRITON_AUTOTUNE", "1") != "0"


def launcher(kernel):
    """``wrap_triton(kernel)`` so ``torch.compile`` and ``make_fx`` see the launch; under the
    interpreter the kernel itself (the interpreter's kernels cannot be traced)."""
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def is_fake(*tensors) -> bool:
    """Tracing with fake tensors (shapes only): under the interpreter, skip the launch."""
    if not INTERPRET:  # compiled kernels: wrap_triton makes their launches traceable
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.device.type == "meta") for t in tensors)


def register(name: str, mutates_args=()):
    """``torch.library.triton_op`` on a GPU: torch.compile traces into the op's Triton
    kernels (Inductor sees and schedules them). Under the interpreter, an opaque
    ``custom_op`` whose fake kernel is the same function run on fake tensors with the
    launches skipped (the interpreter's kernels cannot be captured in a graph)."""

    def decorate(fn):
        if not INTERPRET:
            return torch.library.triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op

    return decorate


def check_device(op: str, t: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter, CPU ones."""
    want = "cpu" if INTERPRET else "cuda"
    torch._check(t.device.type in (want, "meta"), lambda: (
        f"{op} (triton backend): expects {want} tensors "
        + ("(TRITON_INTERPRET=1 runs the kernels on the CPU)" if INTERPRET else "(Triton kernels run on the GPU)")
        + f", got a tensor on {t.device}"))


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a tensor on cuda:1 while
    cuda:0 is current would otherwise get a launch on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
