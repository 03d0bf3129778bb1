"""``aiaas_fast.convert``: swap a model's modules for the fused ones, keeping its weights,
``state_dict`` keys and outputs."""
from __future__ import annotations

import copy
import logging
from typing import List

from torch import nn

from .nn import LinearReLU, MSELoss

__all__ = ["convert"]

log = logging.getLogger("aiaas_fast")


def _fused_linear_relu(linear: nn.Linear) -> LinearReLU:
    fused = LinearReLU.__new__(LinearReLU)
    nn.Module.__init__(fused)
    fused.in_features, fused.out_features = linear.in_features, linear.out_features
    # The same Parameter objects: an optimizer built on the model before conversion still
    # updates the converted one (with inplace=True), and state_dict keys do not change.
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Replaces, anywhere in ``model``, each ``nn.Linear`` directly followed by ``nn.ReLU``
    inside an ``nn.Sequential`` with ``LinearReLU`` plus ``nn.Identity`` (so indices and
    ``state_dict`` keys stay the same), and each ``nn.MSELoss`` with ``aiaas_fast.nn.MSELoss``.

    Returns the converted model (a deep copy unless ``inplace``). What was replaced is logged
    on the ``aiaas_fast`` logger, printed with ``verbose=True``, and kept as a list of strings
    in ``model.aiaas_fast_conversions``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aiaas_fast.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    replaced: List[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.Sequential):
            names = list(module._modules.keys())
            for a, b in zip(names[:-1], names[1:]):
                first, second = module._modules[a], module._modules[b]
                if type(first) is nn.Linear and type(second) is nn.ReLU:
                    module._modules[a] = _fused_linear_relu(first)
                    module._modules[b] = nn.Identity()
                    replaced.append(f"{prefix}{a}+{prefix}{b}: Linear({first.in_features}, {first.out_features}) + ReLU -> LinearReLU + Identity")
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if type(child) is nn.MSELoss:
                module._modules[name] = MSELoss(reduction=child.reduction)
                replaced.append(f"{prefix}{name}: MSELoss -> aiaas_fast.nn.MSELoss")
                continue
            visit(child, f"{prefix}{name}.")

    if type(model) is nn.MSELoss:
        model, replaced = MSELoss(reduction=model.reduction), ["MSELoss -> aiaas_fast.nn.MSELoss"]
    else:
        visit(model, "")
    for line in replaced:
        log.info("aiaas_fast.convert: %s", line)
        if verbose:
            print(f"aiaas_fast.convert: {line}")
    if not replaced and verbose:
        print("aiaas_fast.convert: nothing to replace")
    model.aiaas_fast_conversions = replaced
    return model
