"""Drop-in modules on the fused ops: same parameters, initialisation and ``state_dict``
keys as their ``torch.nn`` counterparts, so weights move between the two freely."""
# No ``from __future__ import annotations``: torch.fx keeps string annotations as names that a
# traced module cannot be pickled with.
from typing import Sequence, Union

import torch.fx
from torch import Tensor, nn

from .ops import linear_relu, mse_loss
from .scaler import KeepsScalers

# torch.fx.symbolic_trace records the fused ops as calls (leaves): tracing into them would
# hit the backend choice, which proxies cannot take.
torch.fx.wrap("linear_relu")
torch.fx.wrap("mse_loss")

__all__ = ["LinearReLU", "Linear", "MLP", "MSELoss"]


def _refuse_script(module: nn.Module):
    # torch.jit.script calls this on every submodule before compiling: without it the user
    # got TorchScript's message about a dict deep in backend.py.
    raise RuntimeError(f"torch.jit.script cannot compile aiaas_fast.nn.{type(module).__name__} (its fused op picks a "
                       "backend in Python at run time): script aiaas_fast.to_torch(model) instead, or use "
                       "torch.jit.trace, torch.compile or torch.export, which take the fused model as it is")


class LinearReLU(nn.Linear):
    """``nn.Linear`` followed by ReLU, in one fused op (``aiaas_fast.ops.linear_relu``)."""

    __prepare_scriptable__ = _refuse_script

    def forward(self, input: Tensor) -> Tensor:
        return linear_relu(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activation=relu"


class Linear(nn.Linear):
    """A drop-in for ``nn.Linear``. Without an activation to fuse, the best kernel is ATen's
    own addmm (MKL/oneDNN, bias in the product), so this layer calls it; it exists so that a
    model written against ``aiaas_fast.nn`` needs no ``torch.nn`` import."""


class MLP(KeepsScalers, nn.Module):
    """``LinearReLU`` layers of the given hidden widths, then a final ``Linear``.

    ``hidden_features`` is one width or a sequence of widths (one layer each). After
    ``aiaas_fast.fit``, its ``state_dict`` also holds the scalers fit used (see ``KeepsScalers``)."""

    def __init__(self, in_features: int, hidden_features: Union[int, Sequence[int]], out_features: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        hidden = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        widths = [in_features, *hidden]
        for w in [*widths, out_features]:
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ValueError(f"MLP: every width must be a positive int, got {w!r} "
                                 f"(in_features={in_features}, hidden_features={hidden_features}, out_features={out_features})")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.layers = nn.Sequential(*(LinearReLU(a, b, **kw) for a, b in zip(widths[:-1], widths[1:])),
                                    Linear(widths[-1], out_features, **kw))
        self.in_features, self.hidden_features, self.out_features = in_features, tuple(hidden), out_features

    def forward(self, input: Tensor) -> Tensor:
        return self.layers(input)


class MSELoss(nn.MSELoss):
    """A drop-in for ``nn.MSELoss`` on the fused one-pass loss (``aiaas_fast.ops.mse_loss``).

    ``MSELoss("sum")`` and ``MSELoss(reduction="sum")`` both work; torch's deprecated
    ``size_average`` / ``reduce`` are accepted as keywords, or as a bool or None first argument
    (torch's own positional order)."""

    __prepare_scriptable__ = _refuse_script

    def __init__(self, reduction="mean", reduce=None, legacy_reduction=None, *, size_average=None):
        if reduction is None or isinstance(reduction, bool):  # nn.MSELoss(size_average, reduce, reduction)
            size_average, reduction = reduction, legacy_reduction or "mean"
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"MSELoss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        super().__init__(size_average=size_average, reduce=reduce, reduction=reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, self.reduction)
