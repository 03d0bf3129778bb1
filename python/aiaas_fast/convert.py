"""``aiaas_fast.convert``: swap a model's modules for the fused ones, keeping its weights,
``state_dict`` keys and outputs."""
from __future__ import annotations

import copy
import logging
import warnings
from typing import List

from torch import nn

from ._module_checks import RUN_HOOKS, extra_behaviour
from .nn import LinearReLU, MSELoss

__all__ = ["convert", "to_torch"]

log = logging.getLogger("aiaas_fast")


def _as_linear(cls, linear: nn.Linear) -> nn.Linear:
    """``linear`` as a ``cls`` (an nn.Linear class) without a new initialisation: the same
    Parameter objects, so an optimizer built on the model before conversion still updates
    the converted one (with inplace=True), and state_dict keys do not change."""
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.in_features, out.out_features = linear.in_features, linear.out_features
    out.weight = linear.weight
    out.bias = linear.bias
    out.train(linear.training)
    return out


def _why_not_plain(module: nn.Module) -> str:
    """Why swapping ``module`` would lose something it does (empty: nothing): what
    :func:`extra_behaviour` names (its state-dict hooks included: they would stop applying),
    or parameters and buffers besides a Linear's weight and bias."""
    why = extra_behaviour(module, RUN_HOOKS + ("_state_dict_hooks", "_load_state_dict_pre_hooks"))
    if why:
        return f"it {why}"
    if isinstance(module, nn.Linear):
        extra = [n for n, t in [*module._parameters.items(), *module._buffers.items()]
                 if n not in ("weight", "bias") and t is not None]
        if extra or module._modules:
            return f"it holds more than a weight and a bias ({', '.join(extra + list(module._modules))})"
    return ""


def _own_forward(seq: nn.Sequential) -> str:
    """A Sequential subclass with its own forward() may call its layers one by one (a
    pre-activation, a residual): fusing would change what those calls return."""
    if type(seq).forward is nn.Sequential.forward:
        return ""
    return f"{type(seq).__name__} overrides forward(), which may use the layers one by one"


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Replaces, anywhere in ``model``, each ``nn.Linear`` directly followed by ``nn.ReLU``
    inside an ``nn.Sequential`` with ``LinearReLU`` plus ``nn.Identity`` (so indices and
    ``state_dict`` keys stay the same), and each ``nn.MSELoss`` with ``aiaas_fast.nn.MSELoss``.

    Modules that do more than their plain forward (hooks, as pruning and the old
    ``weight_norm``/``spectral_norm`` add; parametrizations; computed weights; extra
    parameters or buffers) are left as they are, with a warning naming the reason: swapping
    them would drop what they do.

    The fused layer returns the activation: code that calls a Sequential's Linear on its
    own (``seq[0](x)`` for a pre-activation) gets relu(linear) after conversion. Sequential
    subclasses that override ``forward()`` are therefore left alone, with a warning; a plain
    Sequential indexed from outside cannot be seen, so convert such a model by hand.

    Returns the converted model (a deep copy unless ``inplace``). What was replaced is logged
    on the ``aiaas_fast`` logger, printed with ``verbose=True``, and kept as a list of strings
    in ``model.aiaas_fast_conversions``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aiaas_fast.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as e:  # e.g. the old weight_norm after a forward: a computed weight
            raise RuntimeError(f"aiaas_fast.convert: the model cannot be copied ({e}); convert it in place with "
                               "inplace=True, or convert a copy made another way") from e
    replaced: List[str] = []
    skipped: List[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.Sequential):
            names = list(module._modules.keys())
            for a, b in zip(names[:-1], names[1:]):
                first, second = module._modules[a], module._modules[b]
                parametrized = isinstance(first, nn.Linear) and getattr(first, "parametrizations", None) is not None
                if (type(first) is nn.Linear or parametrized) and type(second) is nn.ReLU:
                    why = _why_not_plain(first) or _why_not_plain(second) or _own_forward(module)
                    if why:
                        skipped.append(f"{prefix}{a}+{prefix}{b}: Linear + ReLU left as they are: {why}")
                        continue
                    module._modules[a] = _as_linear(LinearReLU, first)
                    module._modules[b] = nn.Identity().train(second.training)
                    replaced.append(f"{prefix}{a}+{prefix}{b}: Linear({first.in_features}, {first.out_features}) + ReLU -> LinearReLU + Identity")
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if type(child) is nn.MSELoss:
                why = _why_not_plain(child)
                if why:
                    skipped.append(f"{prefix}{name}: MSELoss left as it is: {why}")
                else:
                    module._modules[name] = MSELoss(reduction=child.reduction).train(child.training)
                    replaced.append(f"{prefix}{name}: MSELoss -> aiaas_fast.nn.MSELoss")
                continue
            visit(child, f"{prefix}{name}.")

    if type(model) is nn.MSELoss and not _why_not_plain(model):
        model, replaced = MSELoss(reduction=model.reduction).train(model.training), ["MSELoss -> aiaas_fast.nn.MSELoss"]
    else:
        visit(model, "")
    for line in replaced:
        log.info("aiaas_fast.convert: %s", line)
        if verbose:
            print(f"aiaas_fast.convert: {line}")
    for line in skipped:  # a warning: the user may have expected these fused
        log.warning("aiaas_fast.convert: %s", line)
        if verbose:
            print(f"aiaas_fast.convert: {line}")
    if not replaced and verbose:
        print("aiaas_fast.convert: nothing to replace")
    model.aiaas_fast_conversions = replaced
    return model


def to_torch(model: nn.Module, inplace: bool = False, fold_scalers: bool = False) -> nn.Module:
    """The inverse of :func:`convert`: the same network in plain ``torch.nn`` modules, for
    deployment where aiaas_fast is not installed (a pickled model, ``torch.jit.script``,
    ``torch.jit.trace``, ``torch.export`` and ONNX files then hold no ``aiaas_fast`` class or
    operator).

    - ``LinearReLU`` + ``nn.Identity`` in a Sequential (what convert() made) -> ``nn.Linear`` +
      ``nn.ReLU``: the same ``state_dict`` keys;
    - ``aiaas_fast.nn.MLP`` -> ``nn.Sequential(Linear, ReLU, ..., Linear)`` (keys ``0``, ``2``, ...,
      the usual layout of a hand-written MLP);
    - any other ``LinearReLU`` -> ``nn.Sequential(Linear, ReLU)`` (its keys gain ``0.``);
    - ``aiaas_fast.nn.Linear`` / ``MSELoss`` -> ``nn.Linear`` / ``nn.MSELoss``.

    The outputs are the same (the fused op computes relu(linear)). Modules with hooks,
    parametrizations or pruning are left as they are, with a warning, as convert() leaves them.

    A model trained by ``fit`` works on standardised inputs and outputs. By default the result
    is that network as it is (plain code applies ``model.aiaas_fast_scalers`` around it; a
    warning says so). ``fold_scalers=True`` folds them into the first and last ``Linear``
    (computed in float64, then cast to the weights' dtype), so the result maps raw x to y in
    its units; with float32 weights, inputs far from zero relative to their spread (a
    timestamp) lose precision there, and a warning says when. Returns a deep copy unless
    ``inplace``.
    """
    from .ensemble import Ensemble
    from .nn import MLP, Linear

    who = "aiaas_fast.to_torch"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, Ensemble):
        raise TypeError(f"{who}: an Ensemble has no plain torch.nn equivalent; convert its members "
                        "(to_torch(ensemble.member(k)) for each k)")
    scalers = getattr(model, "aiaas_fast_scalers", None)
    if fold_scalers and not scalers:
        raise ValueError(f"{who}: fold_scalers=True but the model has no scalers (it was not trained by aiaas_fast.fit)")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as e:  # e.g. the old weight_norm after a forward: a computed weight
            raise RuntimeError(f"{who}: the model cannot be copied ({e}); use inplace=True") from e
    skipped: List[str] = []

    def plain(module: nn.Module, name: str) -> nn.Module:
        kind = type(module)
        if kind not in (MLP, LinearReLU, Linear, MSELoss):
            return module
        children = module.layers.named_children() if kind is MLP else ()
        why = _why_not_plain(module) or next((f"its layer {n} {w}" for n, w in
                                              ((n, _why_not_plain(m)) for n, m in children) if w), "")
        if why:
            skipped.append(f"{name or kind.__name__}: {why}")
            return module
        if kind is MLP:
            layers = []
            for layer in module.layers:
                layers.append(_as_linear(nn.Linear, layer))
                if type(layer) is LinearReLU:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers).train(module.training)
        if kind is LinearReLU:
            return nn.Sequential(_as_linear(nn.Linear, module), nn.ReLU()).train(module.training)
        if kind is Linear:
            return _as_linear(nn.Linear, module)
        return nn.MSELoss(reduction=module.reduction).train(module.training)

    def visit(module: nn.Module, prefix: str) -> None:
        names = list(module._modules)
        for i, name in enumerate(names):
            child = module._modules[name]
            if child is None:
                continue
            after = module._modules[names[i + 1]] if i + 1 < len(names) else None
            if (isinstance(module, nn.Sequential) and type(child) is LinearReLU and type(after) is nn.Identity
                    and not _why_not_plain(child)):
                module._modules[name] = _as_linear(nn.Linear, child)  # convert()'s layout: keys unchanged
                module._modules[names[i + 1]] = nn.ReLU().train(after.training)
                continue
            swapped = plain(child, prefix + name)
            if swapped is child:
                visit(child, f"{prefix}{name}.")
            module._modules[name] = swapped

    result = plain(model, "")
    if result is model:
        visit(model, "")
    for line in skipped:
        warnings.warn(f"{who}: left as it is: {line}", stacklevel=2)
    left = sorted({type(m).__name__ for m in result.modules() if type(m).__module__.startswith("aiaas_fast")})
    if left:
        warnings.warn(f"{who}: the result still holds aiaas_fast modules: {', '.join(left)}", stacklevel=2)
    result.__dict__.pop("aiaas_fast_scalers", None)  # Scaler objects would tie a pickle to aiaas_fast
    result.__dict__.pop("aiaas_fast_conversions", None)
    if fold_scalers:
        _fold(result, scalers, who)
    elif scalers:
        warnings.warn(f"{who}: the model was trained by aiaas_fast.fit on standardised data: plain torch code must "
                      "compute (x - mean) / std before it and y * std + mean after it (model.aiaas_fast_scalers of "
                      "the model you passed), as aiaas_fast.predict does; or pass fold_scalers=True", stacklevel=2)
    return result


def _fold(model: nn.Module, scalers, who: str) -> None:
    """(x - mx) / sx into the first Linear, y * sy + my into the last, in float64."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or not isinstance(model, nn.Sequential) or model[0] is not linears[0] or model[-1] is not linears[-1]:
        raise ValueError(f"{who}: fold_scalers needs a model that starts and ends with nn.Linear (an MLP)")
    first, last = linears[0], linears[-1]
    mx, sx = scalers["x"].mean.double().cpu(), scalers["x"].std.double().cpu()
    my, sy = scalers["y"].mean.double().cpu(), scalers["y"].std.double().cpu()
    with torch.no_grad():
        w = first.weight.double().cpu() / sx
        b = (first.bias.double().cpu() if first.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64))
        first.weight.copy_(w.to(first.weight))
        if first.bias is None:
            first.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=first.weight.dtype, device=first.weight.device))
        first.bias.copy_((b - w @ mx).to(first.bias))
        w2 = last.weight.double().cpu() * sy[:, None]
        b2 = last.bias.double().cpu() * sy + my if last.bias is not None else my
        last.weight.copy_(w2.to(last.weight))
        if last.bias is None:
            last.bias = nn.Parameter(torch.zeros(w2.shape[0], dtype=last.weight.dtype, device=last.weight.device))
        last.bias.copy_(b2.to(last.bias))
    ratio = float((mx.abs() / sx).max()) if mx.numel() else 0.0
    if first.weight.dtype != torch.float64 and ratio > 1e3:
        warnings.warn(f"{who}: an input column's mean is {ratio:.0e} times its spread: folded into "
                      f"{first.weight.dtype} weights it loses precision; fold into model.double(), or scale outside",
                      stacklevel=3)
