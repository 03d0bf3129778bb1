"""What the three Triton op files share: how a kernel is launched and an op registered,
in compiled mode (GPU) and under Triton's interpreter (CPU, tests)."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

#: Read once, as ``triton.jit`` reads it when our kernels are decorated (at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _mend_interpreter_index() -> bool:
    """Triton's interpreter up to 3.6 turns a scalar kernel argument into a Python int with
    ``int()`` of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars", triton-lang/triton#9171, fixed upstream after 3.6):
    every ``range(0, K, BLOCK)`` over an argument fails. torch 2.11 pins Triton 3.6, so with
    a current NumPy the interpreted kernels could not run at all. Where the interpreter has
    that conversion and NumPy refuses it, wrap the interpreter's tensor patching so that
    ``__index__`` takes the array's single element. Returns whether it did."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # NumPy 1.25-2.3 deprecates it: mend there too
        try:
            int(np.zeros(1, dtype=np.int32))
            return False  # an older NumPy still converts: nothing to mend
        except (TypeError, DeprecationWarning):
            pass
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_aiaas_fast_mended", False):
        return False

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        # Set after the original's own patch, which records and later restores the old value.
        tensor.__index__ = lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]) \
            if np.size(self.handle.data) == 1 else int(self.handle.data)

    patch_lang_tensor._aiaas_fast_mended = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if INTERPRET:
    _mend_interpreter_index()

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
