"""What a module does besides its class's arithmetic: hooks, parametrizations, a computed
weight. Swapping such a module for a fused one (``convert``) or running its arithmetic in the
compiled engine would drop it."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

#: The hooks that change what forward() or backward() computes.
RUN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def extra_behaviour(m: nn.Module, hooks: Sequence[str] = RUN_HOOKS) -> Optional[str]:
    """A phrase for what ``m`` does besides its arithmetic ("has forward pre hooks (...)"),
    or None."""
    if getattr(m, "parametrizations", None) is not None:  # before hooks: it adds state-dict hooks too
        return "has parametrizations (e.g. weight_norm)"
    for h in hooks:
        if getattr(m, h, None):
            return f"has {h.strip('_').replace('_', ' ')} (e.g. pruning, spectral_norm or your own)"
    if isinstance(m, nn.Linear):
        for name in ("weight", "bias"):
            t = getattr(m, name)
            if t is not None and m._parameters.get(name) is not t:
                return f"has a computed {name}, not a parameter of its own (e.g. weight_norm)"
    return None
