"""Many small models of one shape trained at once: one per sensor or plant unit
(``groups``), or a deep ensemble for uncertainty (``bootstrap``).

    ens = aiaas_fast.Ensemble(8, in_features=10, hidden_features=[20], out_features=1)
    history = aiaas_fast.fit_many(ens, X, y)                 # 8 bootstrap members, one C++ call
    pred = aiaas_fast.predict_many(ens, X)                   # pred.mean, pred.std, pred.members

    units = aiaas_fast.Ensemble(n_units, 10, [32, 32], 1)
    aiaas_fast.fit_many(units, X, y, groups=unit_id)         # model k trains on its unit's rows
    y_hat = aiaas_fast.predict_many(units, X, groups=unit_id)

The K models' parameters are stacked, ``(K, out, in)`` per layer; the compiled engine runs
each model's steps on its own rows and its own shuffles, with the models spread over the
CPU threads.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import _C
from .nn import MLP
from .scaler import KeepsScalers
from .training import Scaler, _as_tensor, _check_hyperparameters, _progress, _check_feature_count

__all__ = ["Ensemble", "fit_many", "predict_many", "ManyHistory", "EnsemblePrediction"]


class Ensemble(KeepsScalers, nn.Module):
    """K MLPs of one shape (``LinearReLU`` hidden layers, a final ``Linear``), stacked.

    ``forward(x)``: x of shape (batch, in) goes to every model, (K, batch, in) gives each model
    its own rows; returns (K, batch, out). Each member is initialised as ``nn.Linear`` would."""

    def __init__(self, num_models: int, in_features: int, hidden_features: Union[int, Sequence[int]],
                 out_features: int, *, device=None, dtype=None):
        super().__init__()
        hidden = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        widths = [in_features, *hidden, out_features]
        if not isinstance(num_models, int) or num_models < 1:
            raise ValueError(f"Ensemble: num_models must be a positive int, got {num_models!r}")
        for w in widths:
            if not isinstance(w, int) or w < 1:
                raise ValueError(f"Ensemble: every width must be a positive int, got {w!r} (widths {widths})")
        kw = dict(device=device, dtype=dtype)
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(num_models, b, a, **kw))
                                         for a, b in zip(widths[:-1], widths[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(num_models, b, **kw)) for b in widths[1:]])
        self.num_models, self.widths = num_models, widths
        self.group_values: Optional[list] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w, b in zip(self.weights, self.biases):
                for k in range(self.num_models):  # nn.Linear's initialisation, model by model
                    nn.init.kaiming_uniform_(w[k], a=math.sqrt(5))
                    bound = 1 / math.sqrt(w.shape[2])
                    nn.init.uniform_(b[k], -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x: (rows, in) for every model, or (K, rows, in) one batch per model; (K, rows, out)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"Ensemble: x must be a tensor, got {type(x).__name__}")
        ok = (x.dim() == 2 or (x.dim() == 3 and x.shape[0] == self.num_models)) and x.shape[-1] == self.widths[0]
        if not ok:
            raise ValueError(f"Ensemble: x must be (rows, {self.widths[0]}) or ({self.num_models}, rows, "
                             f"{self.widths[0]}), got shape {list(x.shape)}")
        w0 = self.weights[0]
        if x.device != w0.device or (x.dtype != w0.dtype and not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"Ensemble: x is {x.dtype} on {x.device}, the ensemble {w0.dtype} on {w0.device}")
        h = x.expand(self.num_models, *x.shape) if x.dim() == 2 else x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < last:
                h = torch.relu(h)
        return h

    def member(self, k: int) -> MLP:
        """Model k as a standalone ``aiaas_fast.nn.MLP`` (a copy of its weights, and of its scalers
        after ``fit_many``)."""
        if not 0 <= k < self.num_models:
            raise IndexError(f"Ensemble.member: k={k} is out of range for {self.num_models} models")
        w0 = self.weights[0]
        mlp = MLP(self.widths[0], self.widths[1:-1], self.widths[-1], device=w0.device, dtype=w0.dtype)
        linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for lin, w, b in zip(linears, self.weights, self.biases):
                lin.weight.copy_(w[k])
                lin.bias.copy_(b[k])
        scalers = getattr(self, "aiaas_fast_scalers", None)
        if scalers:  # fit_many's, stacked per model: model k's, so predict(member) is model k's prediction
            mlp.aiaas_fast_scalers = {n: Scaler(s.mean[k].clone(), s.std[k].clone()) for n, s in scalers.items()}
        return mlp

    @classmethod
    def from_models(cls, models: Sequence[nn.Module]) -> "Ensemble":
        """Stacks MLPs of one shape (``aiaas_fast.nn.MLP`` or Sequential Linear/ReLU)."""
        from .engine import mlp_layers

        layer_lists = [mlp_layers(m) for m in models]
        if not layer_lists:
            raise ValueError("Ensemble.from_models: no models")
        shapes = [[tuple(lin.weight.shape) for lin, _ in layers] for layers in layer_lists]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"Ensemble.from_models: the models differ in shape: {shapes[0]} vs "
                             f"{next(s for s in shapes if s != shapes[0])}")
        # An Ensemble is ReLU after every hidden layer, none after the last, every layer with bias.
        for i, layers in enumerate(layer_lists):
            relus = [relu for _, relu in layers]
            if relus != [True] * (len(layers) - 1) + [False]:
                raise ValueError(f"Ensemble.from_models: model {i} has ReLU after layers {[j for j, r in enumerate(relus) if r]}; "
                                 "an Ensemble has one after every layer but the last")
            if any(lin.bias is None for lin, _ in layers):
                raise ValueError(f"Ensemble.from_models: model {i} has a layer without bias; an Ensemble's layers all have one")
        first = layer_lists[0][0][0].weight
        if any(lin.weight.dtype != first.dtype or lin.weight.device != first.device for layers in layer_lists
               for lin, _ in layers):
            raise ValueError("Ensemble.from_models: the models differ in dtype or device")
        widths = [shapes[0][0][1]] + [s[0] for s in shapes[0]]
        ens = cls(len(models), widths[0], widths[1:-1], widths[-1], device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for i in range(len(widths) - 1):
                ens.weights[i].copy_(torch.stack([layers[i][0].weight for layers in layer_lists]))
                ens.biases[i].copy_(torch.stack([layers[i][0].bias for layers in layer_lists]))
        return ens

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, widths={'->'.join(map(str, self.widths))}"


@dataclass
class ManyHistory:
    """Per epoch and model: ``train_loss`` (epochs, K) and, with a validation split,
    ``val_loss`` (epochs, K), both MSE on standardised targets; ``seconds`` per epoch;
    ``rows`` each model trained on; ``val_rmse`` per model (targets' units) at the end, NaN
    for a group with no validation rows (as its val_loss)."""

    train_loss: Tensor
    val_loss: Optional[Tensor]
    seconds: List[float]
    rows: List[int]
    val_rmse: Optional[Tensor] = None
    group_values: Optional[list] = None
    best_epoch: Optional[List[int]] = None  # per model, with patience: the epoch whose weights it kept
    stopped_early: bool = False
    engine: str = "compiled"
    engine_note: str = ""  # what ran the steps
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seconds)


class EnsemblePrediction(NamedTuple):
    members: Tensor  # (K, rows, out)
    mean: Tensor     # (rows, out)
    std: Tensor      # (rows, out), the spread across members (0 for one member)


def _group_ids(groups, n: int, values: Optional[list] = None):
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != n:
        raise ValueError(f"aiaas_fast: groups must be 1-D with one value per row ({n}), got shape {list(g.shape)}")
    if values is None:
        values, ids = np.unique(g, return_inverse=True)
        return [v.item() if hasattr(v, "item") else v for v in values], torch.from_numpy(ids.astype(np.int64))
    lookup = {v: i for i, v in enumerate(values)}
    ids = np.empty(n, dtype=np.int64)
    for r, v in enumerate(g.tolist()):
        if v not in lookup:
            raise ValueError(f"aiaas_fast: row {r} has group {v!r}, for which no model was trained "
                             f"(groups: {values[:10]}{' ...' if len(values) > 10 else ''})")
        ids[r] = lookup[v]
    return values, torch.from_numpy(ids)


def ensemble_engine(ensemble: Ensemble, *, lr: float = 1e-3, weight_decay: float = 0.0, path: str = "auto"):
    """The engine over the ensemble's stacked parameters, with fresh Adam state: the C++ engine
    on the CPU (``path`` as for :class:`aiaas_fast.engine.Engine`), batched products in CUDA
    graphs on a GPU (:mod:`aiaas_fast.ensemble_cuda`). Returns (engine, state), state holding
    (exp_avg, exp_avg_sq, steps (K,)) per parameter tensor in the order weight0, bias0, weight1, ... ."""
    K = ensemble.num_models
    w0 = ensemble.weights[0]
    if w0.dtype != torch.float32 or w0.device.type not in ("cpu", "cuda"):
        raise ValueError(f"aiaas_fast: the many-model engine trains float32 on the CPU or CUDA; the ensemble is "
                         f"{w0.dtype} on {w0.device}")
    if w0.device.type == "cuda":
        from .ensemble_cuda import CudaEnsembleEngine

        if path != "auto":
            raise ValueError(f"aiaas_fast: path={path!r} chooses between the CPU engine's kernels; on CUDA use 'auto'")
        core = CudaEnsembleEngine(list(ensemble.weights), list(ensemble.biases), lr=float(lr),
                                  weight_decay=float(weight_decay))
        return core, core.state
    params = [p for pair in zip(ensemble.weights, ensemble.biases) for p in pair]
    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros(K)) for p in params]
    with torch.no_grad():
        core = _C.MLPEngine(list(ensemble.weights), list(ensemble.biases), [True] * (len(ensemble.weights) - 1) + [False],
                            [s[0] for s in state], [s[1] for s in state], [], [s[2] for s in state],
                            lr=float(lr), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=float(weight_decay),
                            amsgrad=False, maximize=False, decoupled_weight_decay=False, path=path)
    return core, state


def fit_many(ensemble: Ensemble, X, y, *, groups=None, bootstrap: Optional[bool] = None, epochs: int = 100,
             batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0, val_split: float = 0.0,
             seed: int = 0, standardize: bool = True, progress: Optional[bool] = None, patience: Optional[int] = None,
             min_delta: float = 0.0) -> ManyHistory:
    """Trains the K models of ``ensemble`` at once with MSE and Adam, in one engine call.

    ``groups``: one value per row; model k trains on the rows of the k-th distinct value
    (sorted), with its own scalers; K must equal the number of distinct values. Otherwise each
    model trains on all rows, or with ``bootstrap`` (the default without groups) on its own
    sample of them drawn with replacement. ``val_split``: a share of rows (per group) held out
    and scored every epoch. ``patience``: each model keeps its best weights (by its validation
    loss, or its training loss without a validation split), and the run stops once every model
    has gone that many epochs without improving by more than ``min_delta``. The scalers are
    kept on the ensemble for :func:`predict_many`."""
    if not isinstance(ensemble, Ensemble):
        raise TypeError(f"aiaas_fast.fit_many: expects an aiaas_fast.Ensemble, got {type(ensemble).__name__}")
    w0 = ensemble.weights[0]
    if w0.dtype != torch.float32 or w0.device.type not in ("cpu", "cuda"):
        raise ValueError(f"aiaas_fast.fit_many: runs on the compiled engine (float32, on the CPU or CUDA); the "
                         f"ensemble is {w0.dtype} on {w0.device}")
    device = w0.device
    _check_hyperparameters("aiaas_fast.fit_many", epochs, batch_size, lr, val_split, patience, min_delta, seed)
    epochs, batch_size, seed, min_delta = int(epochs), int(batch_size), int(seed), float(min_delta)
    x_all, y_all = _as_tensor("X", X, "aiaas_fast.fit_many"), _as_tensor("y", y, "aiaas_fast.fit_many")
    n, K = len(x_all), ensemble.num_models
    if len(y_all) != n:
        raise ValueError(f"aiaas_fast.fit_many: X has {n} rows but y has {len(y_all)}")
    if x_all.shape[1] != ensemble.widths[0] or y_all.shape[1] != ensemble.widths[-1]:
        raise ValueError(f"aiaas_fast.fit_many: the ensemble takes {ensemble.widths[0]} features and gives "
                         f"{ensemble.widths[-1]} targets; X has {x_all.shape[1]} columns and y {y_all.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)

    # Each model's training and validation rows, and the model whose scalers apply to a row.
    if groups is not None:
        values, ids = _group_ids(groups, n)
        if len(values) != K:
            raise ValueError(f"aiaas_fast.fit_many: groups has {len(values)} distinct values but the ensemble has "
                             f"{K} models")
        members = [perm[ids[perm] == k] for k in range(K)]
    else:
        values, ids = None, None
        members = [perm] * K
    train_rows, val_rows = [], []
    for k, rows in enumerate(members):
        n_val = int(round(len(rows) * val_split))
        if len(rows) - n_val < 1:
            raise ValueError(f"aiaas_fast.fit_many: model {k}{f' (group {values[k]!r})' if values else ''} has "
                             f"{len(rows)} rows, none left to train on after val_split={val_split}")
        val_rows.append(rows[:n_val])
        train_rows.append(rows[n_val:])
    # Scalers: per group, or one for all (fitted on the training rows before any bootstrap);
    # then standardised copies of X and y, row by row.
    if standardize:
        fit_rows = train_rows if groups is not None else train_rows[:1]
        sx, sy = [Scaler.fit(x_all[r]) for r in fit_rows], [Scaler.fit(y_all[r]) for r in fit_rows]
        if groups is None:
            sx, sy = sx * K, sy * K
    else:
        sx = [Scaler(torch.zeros(x_all.shape[1]), torch.ones(x_all.shape[1]))] * K
        sy = [Scaler(torch.zeros(y_all.shape[1]), torch.ones(y_all.shape[1]))] * K
    scalers = {"x": Scaler(torch.stack([s.mean for s in sx]), torch.stack([s.std for s in sx])),
               "y": Scaler(torch.stack([s.mean for s in sy]), torch.stack([s.std for s in sy]))}
    if groups is None and bootstrap is not False:
        base = train_rows[0]
        train_rows = [base[torch.randint(len(base), (len(base),), generator=gen)] for _ in range(K)]
    row_model = ids if ids is not None else torch.zeros(n, dtype=torch.int64)
    xs, ys = (_rows_scaler(scalers[k], row_model).transform(v).contiguous().to(device)
              for k, v in (("x", x_all), ("y", y_all)))

    params = [p for pair in zip(ensemble.weights, ensemble.biases) for p in pair]
    core, _ = ensemble_engine(ensemble, lr=lr, weight_decay=weight_decay)

    has_val = any(len(r) for r in val_rows)
    val_index = torch.cat(val_rows) if has_val else None
    val_model = torch.cat([torch.full((len(r),), k) for k, r in enumerate(val_rows)]) if has_val else None
    val_losses: List[Tensor] = []
    seconds: List[float] = []
    bar = _progress(progress, epochs, "aiaas_fast.fit_many")
    clock = [time.perf_counter()]

    def val_loss_per_model(pred: Tensor) -> Tensor:
        # pred (K, rows, out): model k scored on its own validation rows (all of them without groups).
        if groups is None:
            return ((pred - ys[val_rows[0].to(device)]) ** 2).mean(dim=(1, 2)).double().cpu()
        rows = torch.arange(len(val_index), device=device)
        err = ((pred[val_model.to(device), rows] - ys[val_index.to(device)]) ** 2).mean(1).double().cpu()
        return _mean_per_model(err, val_model, K)

    def on_epoch(epoch, step, steps, epoch_end, losses):
        if not epoch_end:
            return False
        seconds.append(time.perf_counter() - clock[0])
        if has_val:
            val_losses.append(val_loss_per_model(core.predict(xs[(val_rows[0] if groups is None else val_index).to(device)])))
        if bar is not None:
            bar.set_postfix(loss=f"{sum(losses) / K:.4g}")
            bar.update(1)
        clock[0] = time.perf_counter()
        if patience is None:
            return False
        monitored = torch.tensor(losses, dtype=torch.float64)
        if has_val:  # a group without validation rows (NaN) is watched on its training loss
            monitored = torch.where(torch.isnan(val_losses[-1]), monitored, val_losses[-1])
        improved = monitored < best["loss"] - min_delta
        best["loss"] = torch.where(improved, monitored, best["loss"])
        best["bad"] = torch.where(improved, torch.zeros_like(best["bad"]), best["bad"] + 1)
        best["epoch"] = torch.where(improved, torch.full_like(best["epoch"], epoch), best["epoch"])
        with torch.no_grad():
            on_device = improved.to(device)
            for kept, p in zip(best["params"], params):
                kept[on_device] = p[on_device]
        return bool((best["bad"] >= patience).all())

    best = {"loss": torch.full((K,), math.inf, dtype=torch.float64), "bad": torch.zeros(K, dtype=torch.int64),
            "epoch": torch.zeros(K, dtype=torch.int64), "params": [p.detach().clone() for p in params]}
    index = torch.cat(train_rows)
    offsets = torch.tensor([0] + [len(r) for r in train_rows], dtype=torch.int64).cumsum(0)
    try:
        train_loss = core.run(xs, ys, epochs=epochs, batch_size=batch_size, seed=seed, shuffle=True,
                              sample_index=index, sample_offsets=offsets, callback=on_epoch)
    finally:
        if bar is not None:
            bar.close()
    if patience is not None:  # each model's best weights
        with torch.no_grad():
            for kept, p in zip(best["params"], params):
                p.copy_(kept)
    ensemble.aiaas_fast_scalers = scalers
    ensemble.group_values = values
    history = ManyHistory(train_loss=train_loss, val_loss=torch.stack(val_losses) if val_losses else None,
                          seconds=seconds, rows=[len(r) for r in train_rows], group_values=values,
                          best_epoch=best["epoch"].tolist() if patience is not None else None,
                          stopped_early=patience is not None and len(seconds) < epochs,
                          engine_note=_engine_note(device, K))
    if has_val:
        pred = predict_many(ensemble, x_all[val_index], groups=None if groups is None else np.asarray(groups)[val_index.numpy()])
        target = y_all[val_index]
        if groups is None:
            history.val_rmse = ((pred.members - target) ** 2).mean(dim=(1, 2)).sqrt().double()
        else:
            history.val_rmse = _mean_per_model(((pred - target) ** 2).mean(1).double(), val_model, K).sqrt()
    return history


def _rows_scaler(stacked: Scaler, model: Tensor) -> Scaler:
    """Per-model scalers stacked (K, cols) as one scaler per row: row r scaled by model[r]'s."""
    return Scaler(stacked.mean[model], stacked.std[model])


def _mean_per_model(values: Tensor, model: Tensor, K: int) -> Tensor:
    """Mean of values per model index; NaN for a model with no values (a group whose rows
    were too few to hold any out for validation), never a 0 that looks like a perfect fit."""
    counts = torch.bincount(model, minlength=K).double()
    sums = torch.zeros(K, dtype=torch.float64).index_add_(0, model, values)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))


def _engine_note(device: torch.device, K: int) -> str:
    if device.type == "cuda":
        return f"CUDA graphs of batched products: a step of all {K} models is one graph launch"
    return f"the C++ training engine, {K} models in one call"


def predict_many(ensemble: Ensemble, X, groups=None, batch_size: int = 4096):
    """Predictions in the targets' units, with the scalers ``fit_many`` kept.

    An ensemble trained with ``groups``: each row goes to its group's model (``groups``
    required, one value per row); returns (rows, out). Otherwise: every model predicts every
    row; returns :class:`EnsemblePrediction` (members (K, rows, out), mean, std)."""
    x = _as_tensor("X", X, "aiaas_fast.predict_many")
    _check_feature_count("aiaas_fast.predict_many", X, x, ensemble.widths[0], "the ensemble's models take")
    scalers = getattr(ensemble, "aiaas_fast_scalers", None)
    K, device = ensemble.num_models, ensemble.weights[0].device
    if ensemble.group_values is not None:
        if groups is None:
            raise ValueError("aiaas_fast.predict_many: this ensemble has one model per group; pass groups= "
                             "(one value per row)")
        _, ids = _group_ids(groups, len(x), ensemble.group_values)
    elif groups is not None:
        raise ValueError("aiaas_fast.predict_many: this ensemble was not trained with groups; leave groups out")
    outs = []
    dtype = ensemble.weights[0].dtype
    sx, sy = (scalers["x"], scalers["y"]) if scalers else (None, None)
    with torch.no_grad():  # scaled on the CPU (see Scaler; a device may lack float64: MPS)
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if ensemble.group_values is not None:
                ib = ids[i:i + batch_size]
                xb = _rows_scaler(sx, ib).transform(xb, dtype) if sx else xb.to(dtype)
                pred = ensemble(xb.to(device))[ib.to(device), torch.arange(len(xb), device=device)].cpu()
                pred = _rows_scaler(sy, ib).inverse(pred) if sy else pred
            else:  # one x scaler for every member (row 0 of the stack), each member's own y scaler
                xb = Scaler(sx.mean[0], sx.std[0]).transform(xb, dtype) if sx else xb.to(dtype)
                pred = ensemble(xb.to(device)).cpu()
                pred = Scaler(sy.mean[:, None, :], sy.std[:, None, :]).inverse(pred) if sy else pred
            outs.append(pred.cpu())
    if ensemble.group_values is not None:
        return torch.cat(outs) if outs else torch.empty(0, ensemble.widths[-1])
    members = torch.cat(outs, dim=1) if outs else torch.empty(K, 0, ensemble.widths[-1])
    std = members.std(0, unbiased=False) if K > 1 else torch.zeros_like(members[0])
    return EnsemblePrediction(members, members.mean(0), std)
