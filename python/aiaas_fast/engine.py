"""The compiled training engine: whole training steps, and whole runs, of an MLP in C++.

``Engine(model)`` takes an MLP (``aiaas_fast.nn.MLP``, or an ``nn.Sequential`` of ``Linear``
layers each optionally followed by ``ReLU``, as written by hand or by ``aiaas_fast.convert``)
and trains its parameter tensors in place, with MSE loss and Adam/AdamW:

    engine = aiaas_fast.engine.Engine(model, lr=1e-3)
    loss = engine.step(x, y)                                # one step, one call into C++
    losses = engine.run(X, Y, epochs=50, batch_size=64)     # the whole run in C++, GIL released

Given an optimizer (``torch.optim.Adam``/``AdamW`` or aiaas_fast's), the engine updates that
optimizer's own state tensors, so its ``state_dict`` stays valid and a checkpoint taken in
between resumes either way; learning-rate changes in its ``param_groups`` are picked up at
every call. float32, on the CPU (the C++ engine) or on CUDA (the step captured in a CUDA
graph per batch size and replayed, with the fused MLP kernel for widths up to 128:
:mod:`aiaas_fast.engine_cuda`); anything else is refused
with the reason (:func:`unsupported_reason`), and ``aiaas_fast.fit`` then falls back to the
op-by-op path.
"""
from __future__ import annotations

import inspect
import numbers
import operator
from itertools import chain
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.optim.optimizer as _torch_optimizer  # its global step hooks (torch.optim hides the module)
from torch import Tensor, nn

from . import _C
from ._module_checks import RUN_HOOKS, extra_behaviour
from .nn import LinearReLU, MLP
from .optim import Adam, AdamW

__all__ = ["Engine", "UnsupportedModel", "mlp_layers", "unsupported_reason"]


class UnsupportedModel(ValueError):
    """The model, loss or optimizer is outside what the compiled engine runs."""


def _flatten(module: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    if isinstance(module, MLP):
        return _flatten(module.layers, f"{prefix}layers.")
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module._modules.items():  # as forward() runs them: a module used twice twice
            if child is not None:
                out += _flatten(child, f"{prefix}{name}.")
        return out
    return [(prefix.rstrip("."), module)]


#: The forward() of each module kind the engine reproduces, by class: a subclass that
#: overrides forward computes something else, which the engine would not see.
_KNOWN_FORWARDS = {nn.Sequential: nn.Sequential.forward, MLP: MLP.forward, nn.Linear: nn.Linear.forward,
                   LinearReLU: LinearReLU.forward, nn.ReLU: nn.ReLU.forward, nn.Identity: nn.Identity.forward}


def _unseen_behaviour(name: str, m: nn.Module) -> Optional[str]:
    """Why running m's arithmetic in the engine would not be m's own forward (None: it would)."""
    base = next((k for k in (LinearReLU, MLP, nn.Linear, nn.ReLU, nn.Identity, nn.Sequential) if isinstance(m, k)), None)
    label = name or "the model"
    if base is not None and type(m).forward is not _KNOWN_FORWARDS[base]:
        return (f"{label}: {type(m).__name__} overrides {base.__name__}.forward(), which the compiled engine "
                "would not run")
    why = extra_behaviour(m)
    return f"{label} {why}, which the compiled engine would not run" if why else None


def _snapshot(model: nn.Module) -> Tuple[list, list]:
    """What mlp_layers' verdict depends on, cheaply: every module, its class and parameters
    (compared by identity), and its hook counts and parameters' requires_grad (by value).
    While it is unchanged, so is the verdict; building it costs a few microseconds where
    mlp_layers costs ~150 (a predict() of a small model costs less than that)."""
    objs: list = []
    flags: list = []
    stack = [model]
    while stack:
        m = stack.pop()
        if m is None:
            flags.append(None)
            continue
        d = m.__dict__
        objs += (m, type(m), *d["_parameters"].values())
        flags += [len(d["_parameters"]), len(d["_modules"])]
        flags += [len(d.get(h) or ()) for h in RUN_HOOKS]
        flags += [p.requires_grad for p in d["_parameters"].values() if p is not None]
        stack += reversed(d["_modules"].values())
    return objs, flags


def _global_hooks() -> Optional[str]:
    from torch.nn.modules import module as _module

    for h in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks"):
        if getattr(_module, h, None):
            return f"global module hooks are registered ({h.strip('_')}), which the compiled engine would not run"
    return None


def mlp_layers(model: nn.Module) -> List[Tuple[nn.Linear, bool]]:
    """The model's layers as (Linear, followed by ReLU); raises :class:`UnsupportedModel` with
    the reason when it is not a plain MLP the engine can run exactly as its forward() would:
    no subclass with its own forward(), no hooks or parametrizations, no layer or parameter
    used twice."""
    reason = _global_hooks() or _unseen_behaviour("", model)
    if reason:
        raise UnsupportedModel(reason)
    if isinstance(model, nn.Linear):
        layers = [[model, isinstance(model, LinearReLU)]]
        seen_layers = {id(model): ""}
    elif not isinstance(model, (nn.Sequential, MLP)):
        raise UnsupportedModel(
            f"the compiled engine runs aiaas_fast.nn.MLP or nn.Sequential of Linear/ReLU layers; got "
            f"{type(model).__name__}, whose forward() it cannot see")
    else:
        layers, seen_layers = _sequential_layers(model)
    return _checked(model, layers, seen_layers)


def _sequential_layers(model: nn.Module):
    for name, m in model.named_modules(remove_duplicate=False):
        reason = _unseen_behaviour(name, m)
        if reason:
            raise UnsupportedModel(reason)
    layers: List[List] = []
    seen_layers = {}
    for name, m in _flatten(model, ""):
        if isinstance(m, nn.Identity):
            continue
        if isinstance(m, nn.ReLU):
            if not layers or layers[-1][1]:
                raise UnsupportedModel(f"{name}: a ReLU that does not follow a Linear layer")
            layers[-1][1] = True
        elif isinstance(m, nn.Linear):
            if id(m) in seen_layers:
                raise UnsupportedModel(f"{name}: the layer {seen_layers[id(m)]} used a second time (shared weights)")
            seen_layers[id(m)] = name
            layers.append([m, isinstance(m, LinearReLU)])
        else:
            raise UnsupportedModel(f"{name}: {type(m).__name__} is not a layer the compiled engine runs "
                                   "(Linear, ReLU, Identity)")
    if not layers:
        raise UnsupportedModel("the model has no Linear layers")
    return layers, seen_layers


def _checked(model: nn.Module, layers: List[List], seen_layers: dict) -> List[Tuple[nn.Linear, bool]]:
    owners = {}
    for lin, _ in layers:
        for pname, p in lin.named_parameters():
            pname = f"{seen_layers[id(lin)]}.{pname}".lstrip(".")
            if id(p) in owners:
                raise UnsupportedModel(f"{pname} is the same tensor as {owners[id(p)]} (shared weights): the engine "
                                       "would update it twice a step")
            owners[id(p)] = pname
    known = {id(p) for lin, _ in layers for p in lin.parameters()}
    for pname, p in model.named_parameters():
        if id(p) not in known:
            raise UnsupportedModel(f"parameter {pname} is not a Linear weight or bias")
    for lin, _ in layers:
        for pname, p in lin.named_parameters():
            if p.device.type not in ("cpu", "cuda"):
                raise UnsupportedModel(f"the compiled engine runs on the CPU or CUDA; the model is on {p.device}")
            if p.device != layers[0][0].weight.device:
                raise UnsupportedModel("the model's parameters are on more than one device")
            if p.dtype != torch.float32:
                raise UnsupportedModel(f"the compiled engine runs float32; the model is {p.dtype}")
            if not p.requires_grad:
                raise UnsupportedModel("a frozen parameter (requires_grad=False): the engine trains every parameter")
            if not p.is_contiguous():
                raise UnsupportedModel("a non-contiguous parameter")
    return [(lin, relu) for lin, relu in layers]


def _own_step(cls):
    # torch wraps a class's step for the profiler at its first instance (_patch_step_function).
    return inspect.unwrap(cls.step)


_KNOWN_STEPS = (torch.optim.Adam, torch.optim.AdamW, Adam, AdamW)


def _step_replaced(optimizer) -> bool:
    """Whether optimizer.step was replaced on the instance (``opt.step = clamped_step``): the
    engine would skip it. Wrappers that only run the optimizer's own step, a learning-rate
    scheduler's (which records the call) and ``torch.compile(opt.step)``, are seen through."""
    step = optimizer.__dict__.get("step")
    if step is None:
        return False
    while True:
        if getattr(step, "_wrapped_by_lr_sched", False):
            step = step.__wrapped__
        elif getattr(step, "_torchdynamo_orig_callable", None) is not None:
            step = step._torchdynamo_orig_callable
        else:
            break
    if getattr(step, "__self__", None) is optimizer:  # the bound method itself
        step = step.__func__
    return inspect.unwrap(step) is not _own_step(type(optimizer))


def _step_refusal(optimizer) -> Optional[str]:
    """Why the engine's own update would skip part of this optimizer's step (None: nothing):
    a step replaced on the instance, or step hooks. Checked at construction and every step
    (both can be added after the engine was built)."""
    if _step_replaced(optimizer):
        return "optimizer.step was replaced on the optimizer, which the compiled engine would not call"
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks):
        return "the optimizer has step hooks (register_step_pre_hook/post_hook), which the compiled engine would not call"
    return None


def _optimizer_hyper(optimizer, params: Sequence[Tensor]) -> dict:
    if not isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW):
        raise UnsupportedModel(f"the compiled engine runs Adam and AdamW; got {type(optimizer).__name__}")
    # The engine does the update itself: what a step() override or a step hook adds would be skipped.
    if all(_own_step(type(optimizer)) is not _own_step(cls) for cls in _KNOWN_STEPS):
        raise UnsupportedModel(f"{type(optimizer).__name__} overrides step(), which the compiled engine would not call")
    refusal = _step_refusal(optimizer)
    if refusal:
        raise UnsupportedModel(refusal)
    ids = {id(p) for p in params}
    seen, hyper = set(), None
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("differentiable"):
            raise UnsupportedModel("capturable/differentiable Adam is not supported by the compiled engine")
        beta1, beta2 = group["betas"]
        h = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                 weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
                 maximize=bool(group.get("maximize", False)),
                 decoupled_weight_decay=bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))))
        if hyper is not None and h != hyper:
            raise UnsupportedModel("the optimizer's parameter groups have different hyperparameters")
        hyper = h
        seen |= {id(p) for p in group["params"]}
    if seen != ids:
        raise UnsupportedModel("the optimizer's parameters are not exactly the model's")
    return hyper


def _groups_signature(optimizer) -> tuple:
    """What the engine reads from the optimizer's param_groups, cheaply (every step): a change
    (a scheduler's lr, new betas, a group added) makes it read them again. Tensor values as
    floats: a scheduler changes a tensor lr in place."""
    return tuple((_value(g["lr"]), g["betas"], g["eps"], g["weight_decay"], g["amsgrad"], g.get("maximize"),
                  g.get("decoupled_weight_decay"), g.get("capturable"), g.get("differentiable"), len(g["params"]))
                 for g in optimizer.param_groups)


def _value(v):
    return float(v) if isinstance(v, Tensor) else v


def unsupported_reason(model: nn.Module, optimizer=None, loss_fn=None) -> Optional[str]:
    """None when the engine can train ``model`` with this optimizer and loss, else why not."""
    try:
        layers = mlp_layers(model)
        if optimizer is not None:
            _optimizer_hyper(optimizer, [p for lin, _ in layers for p in lin.parameters()])
    except UnsupportedModel as e:
        return str(e)
    if loss_fn is not None and not (isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean"):
        return f"the compiled engine computes a mean MSE loss; got {type(loss_fn).__name__}"
    return None


def auto_reason(model: nn.Module, optimizer=None, loss_fn=None) -> Optional[str]:
    """Why ``fit(engine="auto")`` does not pick the engine (None: it does). On CUDA the
    engine (a captured CUDA graph) is used only when asked for by name until it has been
    measured on a GPU."""
    reason = unsupported_reason(model, optimizer, loss_fn)
    if reason is None and next(model.parameters()).device.type == "cuda":
        return "the CUDA graph engine is used only with engine='compiled' until it has been measured on a GPU"
    return reason


class Engine:
    """Trains ``model`` in place with MSE loss and Adam (see the module docstring).

    Without ``optimizer``, the engine holds its own Adam state with ``lr`` (default 1e-3),
    ``betas`` ((0.9, 0.999)), ``eps`` (1e-8), ``weight_decay`` (0), ``amsgrad`` and
    ``decoupled_weight_decay`` (AdamW) (False). With one, they are the optimizer's: passing
    any of them too is an error, not a setting silently ignored.
    ``path``: on the CPU, ``"auto"`` picks hand-vectorized kernels or the BLAS per layer by
    size, ``"small"`` / ``"blas"`` force one (for tests and measurements); on CUDA,
    ``"auto"`` takes the fused MLP kernel for widths up to 128 and the fused ops otherwise,
    ``"fused"`` / ``"graph"`` force one."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 lr: Optional[float] = None, betas: Optional[Tuple[float, float]] = None, eps: Optional[float] = None,
                 weight_decay: Optional[float] = None, amsgrad: Optional[bool] = None,
                 decoupled_weight_decay: Optional[bool] = None, path: str = "auto"):
        own = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                   decoupled_weight_decay=decoupled_weight_decay)
        if optimizer is not None and any(v is not None for v in own.values()):
            given = ", ".join(k for k, v in own.items() if v is not None)
            raise ValueError(f"aiaas_fast.Engine: {given} given with an optimizer, whose own settings the engine "
                             "uses; set them on the optimizer, or leave the optimizer out")
        lr = 1e-3 if lr is None else lr
        betas = (0.9, 0.999) if betas is None else betas
        eps = 1e-8 if eps is None else eps
        weight_decay = 0.0 if weight_decay is None else weight_decay
        amsgrad, decoupled_weight_decay = bool(amsgrad), bool(decoupled_weight_decay)
        layers = mlp_layers(model)
        self.model = model
        self.optimizer = optimizer
        params: List[Tensor] = []
        for lin, _ in layers:
            params.append(lin.weight)
            if lin.bias is not None:
                params.append(lin.bias)
        if optimizer is not None:
            state = self._take_optimizer_state(params)
        else:
            self._hyper = dict(lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]), eps=float(eps),
                               weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=False,
                               decoupled_weight_decay=bool(decoupled_weight_decay))
            state = [self._fresh_state(p, amsgrad) for p in params]
        self.state = state
        self._params = params
        self._addresses = [p.data_ptr() for p in params]  # what the kernels (and captured graphs) write
        self._built_as = _snapshot(model)
        self._layers, self._path = layers, path
        self._build_core()

    def _build_core(self) -> None:
        layers, params, state = self._layers, self._params, self.state
        if self.optimizer is not None:
            # What the core writes: the optimizer's state dict per parameter and the tensors in
            # it. A load_state_dict or state.clear() replaces them, and the engine must follow.
            # Compared by identity in map()s over flat lists, without looking the parameters up
            # (a tensor's __hash__ is Python code): 2.7 us a step for the seed network on a slow
            # VM, where its whole step took 17 us.
            dicts = list(self.optimizer.state.values())
            self._held_state = (self.optimizer.state, dicts, list(chain.from_iterable(map(dict.values, dicts))))
        if params[0].device.type == "cuda":
            from .engine_cuda import CudaGraphEngine

            self._core = CudaGraphEngine(layers, params, state, self._hyper, path=self._path)
            return
        with torch.no_grad():
            self._core = _C.MLPEngine(
                [lin.weight for lin, _ in layers], [lin.bias for lin, _ in layers], [relu for _, relu in layers],
                [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                [s["max_exp_avg_sq"] for s in state] if self._hyper["amsgrad"] else [],
                [s["step"] for s in state], path=self._path, **self._hyper)

    def _state_is_held(self) -> bool:
        owner, dicts, values = self._held_state
        state = self.optimizer.state
        return (state is owner and len(state) == len(dicts) and all(map(operator.is_, state.values(), dicts))
                and all(map(operator.is_, chain.from_iterable(map(dict.values, dicts)), values)))

    def _follow_optimizer_state(self) -> None:
        """The optimizer's state was replaced (load_state_dict, state.clear(), a tensor
        assigned): take it as it is now, as torch.optim.Adam's next step would, and build the
        core on it (a new CUDA graph capture on a GPU)."""
        self.state = self._take_optimizer_state(self._params)
        self._build_core()

    def _take_optimizer_state(self, params: List[Tensor]) -> List[dict]:
        """The optimizer's hyperparameters and its state for params, in the form the core updates."""
        self._hyper = _optimizer_hyper(self.optimizer, params)
        self._signature = _groups_signature(self.optimizer)
        return [self._optimizer_state(p, self._hyper["amsgrad"]) for p in params]

    @staticmethod
    def _fresh_state(p: Tensor, amsgrad: bool) -> dict:
        s = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if amsgrad:
            s["max_exp_avg_sq"] = torch.zeros_like(p)
        return s

    def _optimizer_state(self, p: Tensor, amsgrad: bool) -> dict:
        """The optimizer's state for p, created as torch.optim.Adam would, and made the form the
        engine updates in place (a float32 CPU step, contiguous float32 moments)."""
        state = self.optimizer.state[p]
        if len(state) == 0:
            state.update(self._fresh_state(p, False))
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p)
        step = state["step"]
        if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device.type != "cpu" or step.numel() != 1:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state and not (state[key].dtype == torch.float32 and state[key].is_contiguous()
                                     and state[key].device == p.device and state[key].shape == p.shape):
                state[key] = state[key].detach().to(p.device, torch.float32).contiguous().reshape(p.shape)
        return state

    def _sync(self) -> None:
        """Picks up hyperparameter changes (a learning-rate scheduler) from the optimizer."""
        if self.optimizer is None:
            return
        # The engine steps for the optimizer: tell a learning-rate scheduler so (it checks
        # this flag, set by its wrapper of optimizer.step, to warn about a wrong call order).
        self.optimizer._opt_called = True
        refusal = _step_refusal(self.optimizer)  # a hook or a new step added after the engine was built
        if refusal:
            raise UnsupportedModel(refusal)
        if not self._state_is_held():
            return self._follow_optimizer_state()
        signature = _groups_signature(self.optimizer)
        if signature != self._signature:
            hyper = _optimizer_hyper(self.optimizer, self._params)
            if hyper["amsgrad"] != self._hyper["amsgrad"]:
                raise RuntimeError("aiaas_fast.Engine: amsgrad was changed in the optimizer after the engine was built; "
                                   "build a new Engine for it")
            self._hyper, self._signature = hyper, signature
            self._core.set_hyperparameters(**self._hyper)

    @property
    def lr(self) -> float:
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = value
        self._hyper["lr"] = float(value)
        self._core.set_hyperparameters(**self._hyper)

    def layer_paths(self, batch_size: int) -> List[str]:
        """``"small"`` (hand kernels) or ``"blas"`` for each layer at this batch size on the
        CPU; on CUDA ``"cuda-fused-mlp"`` (the fused MLP kernel in a CUDA graph) or
        ``"cuda-graph"`` (the fused ops in a CUDA graph)."""
        if self._on_cuda:
            return ["cuda-fused-mlp" if self._core.path == "fused" else "cuda-graph"] * len(mlp_layers(self.model))
        return self._core.layer_paths(batch_size)

    @property
    def description(self) -> str:
        """What runs the steps, in words (the command and ``History.engine_note`` show it)."""
        if not self._on_cuda:
            return "the C++ training engine"
        return ("a CUDA graph of the fused MLP kernel" if self._core.path == "fused"
                else "a CUDA graph of the fused ops")

    def _check_params(self) -> None:
        """The engine holds the tensors it was built with: a model whose parameters were
        replaced since (``load_state_dict(assign=True)``, a new layer) would train stale copies."""
        if not _global_hooks() and [p.data_ptr() for p in self._params] == self._addresses:
            objs, flags = _snapshot(self.model)
            was_objs, was_flags = self._built_as
            if flags == was_flags and len(objs) == len(was_objs) and all(a is b for a, b in zip(objs, was_objs)):
                return  # nothing mlp_layers looks at has changed
        now = [p for lin, _ in mlp_layers(self.model) for p in (lin.weight, lin.bias) if p is not None]
        if len(now) != len(self._params) or any(a is not b for a, b in zip(now, self._params)):
            raise RuntimeError("aiaas_fast.Engine: the model's parameter tensors were replaced after the engine was "
                               "built (e.g. load_state_dict(assign=True)); build a new Engine for the model")
        if [p.data_ptr() for p in now] != self._addresses:
            raise RuntimeError("aiaas_fast.Engine: a parameter's storage was replaced after the engine was built "
                               "(e.g. param.data = ...); build a new Engine for the model")

    @property
    def _on_cuda(self) -> bool:
        return not isinstance(self._core, _C.MLPEngine)

    def step(self, x: Tensor, y: Tensor) -> float:
        """Forward, MSE loss, backward and the Adam update on one mini-batch; returns the loss.
        A parameter given new storage or shape (``param.data = ...``) is refused at every call;
        a parameter object replaced in the model (``load_state_dict(assign=True)``) only by
        run() and predict(): after that, build a new Engine."""
        self._sync()
        if self._on_cuda:
            # The captured graph writes the addresses it was captured with: a parameter whose
            # storage moved (param.data = ...) would leave the module untrained. ~1 us to check.
            if [p.data_ptr() for p in self._params] != self._addresses:
                self._check_params()
            return self._core.step(x, y)
        return float(self._core.step(x, y)[0])

    def run(self, X: Tensor, Y: Tensor, *, epochs: int, batch_size: int = 64, seed: int = 0, shuffle: bool = True,
            callback: Optional[Callable[..., Optional[bool]]] = None, callback_every: int = 0,
            rows: Optional[Tensor] = None) -> Tensor:
        """``epochs`` passes over (X, Y) in mini-batches, all in C++ without the GIL; returns
        each epoch's mean training loss (weighted by rows), shape ``(epochs run,)``.

        ``shuffle``: a new order every epoch from ``seed``. ``rows``: train on these rows, in
        this order when not shuffling. ``callback(epoch, step, steps_in_epoch, epoch_end,
        losses)`` runs every ``callback_every`` steps and at each epoch's end (``losses``: the
        epoch's mean loss so far); returning True stops the run there."""
        self._check_params()
        self._sync()
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"Engine.run: epochs must be an int >= 0, got {epochs!r}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"Engine.run: seed must be an int in [0, 2^64), got {seed!r}")
        seed = int(seed)
        offsets = None
        if rows is not None:
            rows = torch.as_tensor(rows)
            if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
                raise ValueError(f"Engine.run: rows must be integer row indices, got {rows.dtype}")
            rows = rows.to(torch.int64)
            offsets = torch.tensor([0, rows.numel()], dtype=torch.int64)
        if self._on_cuda:
            return self._core.run(X, Y, epochs=epochs, batch_size=batch_size, seed=seed, shuffle=shuffle,
                                  callback=callback, callback_every=callback_every, rows=rows)
        out = self._core.run(X, Y, epochs=epochs, batch_size=batch_size, seed=seed, shuffle=shuffle,
                             callback_every=callback_every, sample_index=rows, sample_offsets=offsets,
                             callback=None if callback is None else
                             (lambda e, s, n, end, losses: callback(e, s, n, end, losses[0])))
        return out[:, 0]

    def predict(self, X: Tensor) -> Tensor:
        """The model's output for X, (rows, out), computed by the engine's kernels."""
        self._check_params()
        out = self._core.predict(X)
        return out if self._on_cuda else out[0]

    def last_gradients(self) -> List[Tensor]:
        """Gradients of the last step, in parameter order (weight, bias per layer): for tests."""
        return self._core.last_gradients()
