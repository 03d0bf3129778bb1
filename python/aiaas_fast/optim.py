"""``Adam`` and ``AdamW``: drop-ins for ``torch.optim.Adam`` / ``AdamW`` whose step is one
native ``aiaas_fast.ops.adam_`` call per (device, dtype) bucket of each parameter group.

They subclass torch's optimizers, so the arguments, ``param_groups``, ``zero_grad``,
learning-rate schedulers and the ``state_dict`` format (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) are torch's own: a checkpoint saved by one loads in the
other and continues on the same trajectory.
"""
from __future__ import annotations

import itertools
import operator

import torch

from . import ops

__all__ = ["Adam", "AdamW"]


def _scalar(value, name):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"aiaas_fast.optim: {name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


class _FusedAdamStep:
    """The step shared by Adam and AdamW; ``_decoupled`` says which weight decay applies.

    Per parameter group, the (device, dtype) buckets of state tensors are built once and
    reused while the same parameters have gradients and ``self.state`` holds the same tensors:
    the state tensors are updated in place, so only the gradients are gathered again each step
    (a tiny seed network's step is mostly this Python). ``load_state_dict`` and
    ``add_param_group`` drop the cache; a state changed by hand (``state.clear()``, a moment
    tensor replaced) is seen at the next step."""

    _decoupled = False

    def _check_supported(self):
        # torch sets this for fused=True: GradScaler then leaves the gradients scaled and hands
        # grad_scale/found_inf to step(). Ours unscales first and skips an overflowing step.
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            if group.get("differentiable"):
                raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__}: differentiable=True is not supported")
            if group.get("capturable"):
                raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__}: capturable=True is not supported yet")

    def _drop_bucket_cache(self):
        self.__dict__["_aiaas_buckets"] = {}

    def add_param_group(self, param_group):
        for flag in ("differentiable", "capturable"):  # refused before it is added, as the constructor refuses it
            if isinstance(param_group, dict) and param_group.get(flag):
                raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__}: {flag}=True is not supported"
                                   + (" yet" if flag == "capturable" else ""))
        self._drop_bucket_cache()
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict):
        self._drop_bucket_cache()
        super().load_state_dict(state_dict)

    def _build_buckets(self, group, params):
        name = type(self).__name__
        buckets, witness = {}, ([], [], [])
        for p in params:
            if torch.is_complex(p):
                raise RuntimeError(f"aiaas_fast.optim.{name} does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:  # as torch.optim.Adam initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lists = buckets.setdefault((p.device, p.dtype), ([], [], [], [], []))
            lists[0].append(p)
            lists[1].append(state["exp_avg"])
            lists[2].append(state["exp_avg_sq"])
            if group["amsgrad"]:
                lists[3].append(state["max_exp_avg_sq"])
            lists[4].append(state["step"])
            witness[0].append(p)
            witness[1].append(state)
            witness[2].extend(state.values())
        return list(buckets.values()), (witness[0], witness[1], witness[2], sum(len(d) for d in witness[1]))

    def _state_unchanged(self, witness) -> bool:
        """Whether self.state still holds, for each parameter, the dict and tensors the cached
        buckets update (identity checks in C loops: 1.6 us of a 28 us step at 4 parameters,
        10 us of 73 at 42)."""
        params, dicts, tensors, count = witness
        if not all(map(operator.is_, map(self.state.get, params), dicts)):
            return False
        return (all(map(operator.is_, itertools.chain.from_iterable(map(dict.values, dicts)), tensors))
                and sum(map(len, dicts)) == count)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cache = self.__dict__.setdefault("_aiaas_buckets", {})
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            key = (tuple(map(id, params)), bool(group["amsgrad"]))
            cached = cache.get(index)
            if cached is None or cached[0] != key or not self._state_unchanged(cached[2]):
                cached = cache[index] = (key, *self._build_buckets(group, params))
            beta1, beta2 = group["betas"]
            hyper = dict(lr=_scalar(group["lr"], "lr"), beta1=_scalar(beta1, "beta1"), beta2=_scalar(beta2, "beta2"),
                         weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                         amsgrad=bool(group["amsgrad"]), maximize=bool(group.get("maximize", False)),
                         decoupled_weight_decay=self._decoupled or bool(group.get("decoupled_weight_decay", False)))
            for bucket_params, exp_avgs, exp_avg_sqs, max_sqs, steps in cached[1]:
                grads = [p.grad for p in bucket_params]
                if any(g.is_sparse for g in grads):  # checked every step: a gradient may turn sparse
                    raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__} does not support sparse gradients")
                ops.adam_(bucket_params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, **hyper)
        return loss


class Adam(_FusedAdamStep, torch.optim.Adam):
    """``torch.optim.Adam`` with a fused native step. ``foreach`` and ``fused`` are accepted
    and ignored (the step is always one fused call); ``capturable`` and ``differentiable``
    are refused."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._check_supported()


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay, default 0.01) with a fused native step."""

    _decoupled = True

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._check_supported()
