"""``Adam`` and ``AdamW``: drop-ins for ``torch.optim.Adam`` / ``AdamW`` whose step is one
native ``aiaas_fast.ops.adam_`` call per (device, dtype) bucket of each parameter group.

They subclass torch's optimizers, so the arguments, ``param_groups``, ``zero_grad``,
learning-rate schedulers and the ``state_dict`` format (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) are torch's own: a checkpoint saved by one loads in the
other and continues on the same trajectory.
"""
from __future__ import annotations

from collections import defaultdict

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
    """The step shared by Adam and AdamW; ``_decoupled`` says which weight decay applies."""

    _decoupled = False

    def _check_supported(self):
        for group in self.param_groups:
            if group.get("differentiable"):
                raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__}: differentiable=True is not supported")
            if group.get("capturable"):
                raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__}: capturable=True is not supported yet")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets = defaultdict(lambda: ([], [], [], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__} does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError(f"aiaas_fast.optim.{type(self).__name__} does not support complex parameters")
                state = self.state[p]
                if len(state) == 0:  # as torch.optim.Adam initialises it
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            decoupled = self._decoupled or bool(group.get("decoupled_weight_decay", False))
            for lists in buckets.values():
                ops.adam_(*lists, lr=_scalar(group["lr"], "lr"), beta1=_scalar(beta1, "beta1"),
                          beta2=_scalar(beta2, "beta2"), weight_decay=float(group["weight_decay"]),
                          eps=float(group["eps"]), amsgrad=bool(group["amsgrad"]),
                          maximize=bool(group.get("maximize", False)), decoupled_weight_decay=decoupled)
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
