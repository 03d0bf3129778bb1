"""Standardisation of features and targets (``Scaler``), and how models carry the scalers
``fit`` used in their ``state_dict`` (``KeepsScalers``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Scaler", "ScalerSet", "KeepsScalers"]

_KEY = "aiaas_fast_scalers."


@dataclass
class Scaler:
    """Per-column standardisation: (v - mean) / std, with std 1 for constant columns.

    Fitted and applied in float64, the result cast after: a column far from zero (a
    timestamp, a totaliser count of 1e9) keeps its variation, which float32 would round
    away before the mean is taken off."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, data: Tensor) -> "Scaler":
        d = data.double()
        std = d.std(0, unbiased=False) if len(d) > 1 else torch.ones(d.shape[1:], dtype=torch.float64)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(d.mean(0), std)

    def _check_columns(self, v: Tensor) -> None:
        # Broadcasting would scale a 1-column input by every column's mean and std: wrong numbers,
        # no error. A one-column scaler over several columns is meant (quantiles of one target).
        columns = self.mean.shape[-1]
        if v.dim() == 0 or (columns != 1 and v.shape[-1] != columns):
            raise ValueError(f"Scaler: the data has {v.shape[-1] if v.dim() else 0} column(s), shape "
                             f"{list(v.shape)}; the scaler was fitted on {self.mean.shape[-1]}")

    def transform(self, v: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        self._check_columns(v)
        mean, std = self.mean.to(v.device, torch.float64), self.std.to(v.device, torch.float64)
        return ((v.double() - mean) / std).to(dtype)

    def inverse(self, v: Tensor) -> Tensor:
        self._check_columns(v)
        mean, std = self.mean.to(v.device, torch.float64), self.std.to(v.device, torch.float64)
        return (v.double() * std + mean).to(v.dtype)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Scaler":
        return cls(d["mean"], d["std"])


class ScalerSet(dict):
    """``{"x": Scaler, "y": Scaler}`` whose entries are attributes too (``scalers.x.mean``), so
    tools that walk a state_dict key to its attribute (torch.distributed.checkpoint) find
    ``aiaas_fast_scalers.x.mean`` on the model."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class KeepsScalers:
    """A mixin for ``nn.Module``s that ``fit`` trains: the scalers it keeps on the model
    (``model.aiaas_fast_scalers``, used by ``predict``) go into ``state_dict()`` as float64
    tensors (``aiaas_fast_scalers.x.mean``, ...), and ``load_state_dict`` brings them back,
    so a saved and reloaded model predicts in the targets' units again. A state dict without
    them (an unfitted model's, or a plain torch one) leaves the model without scalers."""

    def __setattr__(self, name, value):
        if name == "aiaas_fast_scalers" and isinstance(value, dict) and not isinstance(value, ScalerSet):
            value = ScalerSet(value)
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, scaler in (getattr(self, "aiaas_fast_scalers", None) or {}).items():
            for field, value in scaler.state_dict().items():
                destination[f"{prefix}{_KEY}{name}.{field}"] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        head = prefix + _KEY
        found: dict = {}
        for key in [k for k in state_dict if k.startswith(head)]:
            name, _, field = key[len(head):].partition(".")
            found.setdefault(name, {})[field] = state_dict.pop(key)  # load_state_dict's own copy
        try:
            scalers = {name: Scaler.from_state_dict(d) for name, d in found.items()}
        except KeyError as e:
            error_msgs.append(f"{head}: incomplete scaler entries ({e} missing)")
            scalers = {}
        if scalers:
            self.aiaas_fast_scalers = scalers
        else:
            self.__dict__.pop("aiaas_fast_scalers", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
