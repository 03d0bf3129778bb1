"""The ``triton`` backend: the three ops as Triton kernels, one file per op (kernels,
launchers and the ``torch.library`` registration side by side):

- ``linear_relu.py``: ``torch.ops.aiaas_fast.triton_linear_relu`` and ``triton_linear_relu_backward``
- ``mse_loss.py``: ``torch.ops.aiaas_fast.triton_mse_loss``
- ``adam.py``: ``torch.ops.aiaas_fast.triton_adam_``

Importing this package imports Triton; ``aiaas_fast`` itself does so only when the backend
is chosen (``aiaas_fast.set_backend("triton")``, or by default on CUDA without native kernels).
Under ``TRITON_INTERPRET=1`` (set before this import) the kernels run on CPU tensors in
Triton's interpreter, which is how CI checks their numerics without a GPU.
"""
try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError("aiaas_fast.triton needs Triton: pip install triton (CUDA builds of torch on Linux bring it)") from e

from . import adam, linear_relu, mse_loss  # noqa: E402
from ._common import DTYPES, INTERPRET, autotuning  # noqa: E402

__all__ = ["linear_relu", "mse_loss", "adam", "DTYPES", "INTERPRET", "autotuning"]
