"""Which implementation of the ops runs: ``native`` (the compiled ``torch.ops.aiaas_fast.*``
kernels), ``triton`` (``aiaas_fast.triton``, Triton kernels registered with
``torch.library.triton_op``) or ``reference`` (plain PyTorch composites, ``aiaas_fast.reference``:
the tests' oracle and the fallback for devices without native kernels).

    aiaas_fast.set_backend("triton")            # or "native", "reference"; "auto" restores the default
    with aiaas_fast.use_backend("reference"): ...
    AIAAS_FAST_BACKEND=triton python train.py   # read when aiaas_fast is imported

The default ("auto") picks, per device of the op's first tensor, the fastest available:
native where it has a kernel for the device (CPU always; CUDA when built with CUDA kernels),
else Triton on CUDA when Triton is installed, else reference. A backend asked for where it
cannot run is an error that says why, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend"]

BACKENDS = ("native", "triton", "reference")
ENV_VAR = "AIAAS_FAST_BACKEND"
_OPS = ("linear_relu", "mse_loss", "adam_")


class _State:
    name: Optional[str] = None  # None: auto


_state = _State()


def _parse(name, source: str) -> Optional[str]:
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"aiaas_fast: unknown backend {name!r} from {source}; choose one of "
                         f"{', '.join(repr(b) for b in BACKENDS)} or 'auto'")
    return name


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dispatch_key(device_type: str) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "meta": "Meta"}.get(device_type, device_type.upper())


def native_supports(device_type: str, op: str = "linear_relu") -> bool:
    """Whether the compiled library registered a kernel for this device (CUDA: the build's
    CUDA kernels, when there are any)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aiaas_fast::{op}", _dispatch_key(device_type))


def _triton_unavailable(device_type: str) -> Optional[str]:
    if not triton_installed():
        return "Triton is not installed (pip install triton; it comes with CUDA builds of torch on Linux)"
    if device_type == "cuda" or (device_type == "cpu" and triton_interpreting()):
        return None
    if device_type == "cpu":
        return ("the Triton kernels run on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing triton (Triton's interpreter: slow, for tests) or use the 'native' or 'reference' backend")
    return f"the Triton kernels run on CUDA tensors, not on {device_type}"


_DEFAULTS: dict = {}


def _default(device_type: str) -> str:
    # Cached: the kernels registered for a device and Triton's presence are fixed once the
    # library is loaded, and the lookup (a dispatcher query) cost ~4 us on every op call.
    choice = _DEFAULTS.get(device_type)
    if choice is None:
        choice = _DEFAULTS[device_type] = _default_uncached(device_type)
    return choice


def _default_uncached(device_type: str) -> str:
    if native_supports(device_type):
        return "native"
    if device_type == "cuda" and _triton_unavailable(device_type) is None:
        return "triton"
    return "reference"


@torch.compiler.assume_constant_result
def _resolve(name: Optional[str], device_type: str, op: str) -> str:
    # A constant for torch.compile (evaluated once while tracing, guarded on the arguments),
    # so the choice costs compiled code nothing and causes no graph break.
    if name is None:
        name = _default(device_type)
    elif name == "triton":
        why = _triton_unavailable(device_type)
        if why is not None:
            raise RuntimeError(f"aiaas_fast.{op}: the 'triton' backend cannot run on {device_type}: {why}")
    elif name == "native" and not native_supports(device_type, op):
        raise RuntimeError(f"aiaas_fast.{op}: the 'native' backend has no {_dispatch_key(device_type)} kernel in this "
                           f"build (aiaas_fast.build_info() lists what was compiled); use 'triton' or 'reference', or "
                           f"'auto' to pick the fastest available")
    if name == "triton":
        importlib.import_module("aiaas_fast.triton")  # registers torch.ops.aiaas_fast.triton_*
    return name


def _register_triton_ops() -> None:
    """Registers torch.ops.aiaas_fast.triton_* (and their FLOP formulas) now rather than at the
    first op call: a FlopCounterMode entered in between copies the formulas when it is created.
    Best effort: where the import fails, the first call gives the reason."""
    try:
        importlib.import_module("aiaas_fast.triton")
    except Exception:  # noqa: BLE001 - reported by resolve() on use
        pass


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` now; raises if the chosen one cannot."""
    return _resolve(_state.name, device.type, op)


def set_backend(name: Optional[str]) -> None:
    """Selects the backend for every op from now on: "native", "triton", "reference", or
    "auto" (or None) for the fastest available per device."""
    parsed = _parse(name, "set_backend()")
    if parsed == "triton":
        if not triton_installed():
            raise RuntimeError("aiaas_fast.set_backend('triton'): Triton is not installed (pip install triton)")
        _register_triton_ops()
    _state.name = parsed


def get_backend(device=None) -> str:
    """The backend in effect for ``device`` (default: CUDA when available, else CPU); "auto"
    is resolved to the backend it picks there."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _state.name or _default(torch.device(device).type)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """``with use_backend("reference"): ...`` runs the block with that backend, then restores
    the previous choice."""
    previous = _state.name
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


_state.name = _parse(os.environ.get(ENV_VAR) or None, f"the environment variable {ENV_VAR}")
