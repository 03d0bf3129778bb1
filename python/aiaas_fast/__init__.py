"""aiaas_fast: a compiled training core for PyTorch regression networks.

Fused Linear+ReLU, MSE and Adam operators registered as ``torch.ops.aiaas_fast.*``
(with autograd and ``torch.compile`` support), on a C++ library that other CMake
projects can link (``find_package(aiaas_fast)``, see :data:`cmake_prefix_path`).
"""
import os as _os

import torch as _torch

try:
    from . import _build_config
except ImportError as _e:  # running from a source checkout that was never built
    raise ImportError(
        "aiaas_fast's native extension is not built: install the package with "
        "`pip install --no-build-isolation .` from the repository root"
    ) from _e

if _build_config.TORCH_VERSION != _torch.__version__:
    raise ImportError(
        f"aiaas_fast {_build_config.VERSION} was built against torch {_build_config.TORCH_VERSION}, "
        f"but torch {_torch.__version__} is installed; the C++ ABI must match. Rebuild it against "
        "this torch: `pip install --no-build-isolation --force-reinstall --no-deps .`"
    )

from . import _C  # noqa: E402  (loads libaiaas_fast, which registers torch.ops.aiaas_fast)
from . import ops  # noqa: E402  (fake kernels for the ops)
from .backend import get_backend, set_backend, use_backend  # noqa: E402
from . import nn, optim  # noqa: E402
from .convert import convert, to_torch  # noqa: E402
from .training import History, fit, predict  # noqa: E402
from . import datasets, training  # noqa: E402
from . import engine  # noqa: E402
from .ensemble import Ensemble, EnsemblePrediction, ManyHistory, fit_many, predict_many  # noqa: E402

__version__ = _build_config.VERSION

#: Folder to put on ``CMAKE_PREFIX_PATH`` so ``find_package(aiaas_fast CONFIG)`` finds
#: the installed C++ library, as ``torch.utils.cmake_prefix_path`` does for Torch.
cmake_prefix_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")


def build_info() -> dict:
    """How this copy was built: versions, CUDA and its architectures, OpenMP, compiler,
    and the CPU instruction sets compiled in and chosen for this machine."""
    return dict(_C.build_info())


__all__ = ["ops", "set_backend", "get_backend", "use_backend", "nn", "optim", "convert", "to_torch", "fit", "predict", "History",
           "datasets", "training", "engine", "Ensemble", "EnsemblePrediction", "ManyHistory", "fit_many",
           "predict_many", "build_info", "cmake_prefix_path", "__version__"]
