"""``aiaas_fast.fit``: train a regression model on tensors, NumPy arrays or a DataLoader.

Features and targets are standardised with scalers fitted on the training split and kept
with the model (``model.aiaas_fast_scalers``, used by :func:`predict`); the loss is MSE on
the standardised targets, the optimizer ``aiaas_fast.optim.Adam``; validation RMSE, MAE
and R^2 are reported in the targets' own units. Checkpoints hold everything a resumed run
needs to continue exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .nn import MSELoss
from .optim import Adam
from .scaler import Scaler

__all__ = ["fit", "predict", "History", "Scaler"]

CHECKPOINT_FORMAT = "aiaas_fast.fit/1"


@dataclass
class History:
    """Per-epoch records: epoch, train_loss (MSE on standardised targets), val_loss (same),
    val_rmse, val_mae, val_r2 (targets' units), seconds, samples_per_s."""

    epochs: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    stopped_early: bool = False
    engine: str = "ops"     # "compiled" (the C++ engine ran the epochs) or "ops" (op by op)
    engine_note: str = ""   # what ran the engine's steps; or why the op-by-op path ran

    def __getitem__(self, key: str) -> List[float]:
        return [e[key] for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)


def _as_tensor(name: str, value, who: str = "aiaas_fast.fit") -> Tensor:
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number):
            raise ValueError(f"{who}: {name} must be numeric, got a NumPy array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise TypeError(f"{who}: {name} must be a tensor, a NumPy array or a DataLoader, got {type(value).__name__}")
    if value.dim() == 1:
        value = value.unsqueeze(1)
    if value.dim() != 2:
        raise ValueError(f"{who}: {name} must be 1-D or 2-D (rows, columns), got shape {list(value.shape)}")
    # float64 (and integers, which may be large) stay float64 until standardised: see Scaler.
    value = value.double() if value.dtype == torch.float64 or not value.is_floating_point() else value.float()
    bad = ~torch.isfinite(value)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{who}: {name} has a non-finite value ({value[row, col].item()}) at row {row}, column {col}")
    return value


def _check_optimizer_holds_the_model(optimizer, model: nn.Module) -> None:
    """An optimizer over none of the model's trainable parameters would train nothing, with no
    error: typically one built before ``convert(model)``, which returns a copy."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"aiaas_fast.fit: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and not any(id(p) in held for p in trainable):
        raise ValueError("aiaas_fast.fit: the optimizer holds none of the model's parameters, so it would train "
                         "nothing (built before aiaas_fast.convert(model)? convert returns a copy: build the "
                         "optimizer after it, or convert with inplace=True)")


def _check_feature_count(who: str, given, x: Tensor, features: int, what: str) -> None:
    """A clear error for X of the wrong width (given: X as the user passed it), where a
    scaler's broadcast or a model's own message would hide what is wrong."""
    if x.shape[1] == features:
        return
    hint = (f"; for one row pass shape (1, {features}), e.g. X[None]"
            if getattr(given, "ndim", 2) == 1 and len(given) == features else "")
    raise ValueError(f"{who}: X has {x.shape[1]} column(s) (shape {list(getattr(given, 'shape', x.shape))}), but "
                     f"{what} {features} feature(s){hint}")


def _from_loader(loader) -> tuple:
    xs, ys = [], []
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"aiaas_fast.fit: the DataLoader must yield (x, y) pairs; batch {i} is {type(batch).__name__}")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise ValueError("aiaas_fast.fit: the DataLoader yielded no batches")
    return torch.cat(xs), torch.cat(ys)


def _metrics(pred: Tensor, target: Tensor) -> Dict[str, float]:
    """RMSE, MAE and R^2 over all targets pooled; with several targets (in their own units,
    which pooling mixes) also each target's, as lists ``val_rmse_by_target`` etc."""
    err = (pred.double() - target.double())
    ss_res = (err**2).sum(0)
    ss_tot = ((target.double() - target.double().mean(0)) ** 2).sum(0)
    out = {"val_rmse": math.sqrt((err**2).mean().item()), "val_mae": err.abs().mean().item(),
           "val_r2": (1 - ss_res.sum() / ss_tot.sum()).item() if ss_tot.sum() > 0 else float("nan")}
    if err.shape[1] > 1:
        out["val_rmse_by_target"] = (err**2).mean(0).sqrt().tolist()
        out["val_mae_by_target"] = err.abs().mean(0).tolist()
        out["val_r2_by_target"] = [(1 - r / t).item() if t > 0 else float("nan") for r, t in zip(ss_res, ss_tot)]
    return out


def _progress(enabled: Optional[bool], total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience, never a requirement
        return None
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


def _check_hyperparameters(who: str, epochs, batch_size, lr, val_split, patience, min_delta=0.0, seed=0) -> None:
    """fit's and fit_many's shared refusals, naming the argument and its value."""
    def count(v):  # an int, NumPy's included, but not a bool
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

    for name, v, ok in (("epochs", epochs, count(epochs) and epochs >= 1),
                        ("batch_size", batch_size, count(batch_size) and batch_size >= 1),
                        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0),
                        ("val_split", val_split, isinstance(val_split, (int, float)) and 0 <= val_split < 1),
                        ("patience", patience, patience is None or (count(patience) and patience >= 1)),
                        ("min_delta", min_delta, isinstance(min_delta, numbers.Real) and math.isfinite(min_delta)
                         and min_delta >= 0),
                        ("seed", seed, count(seed) and 0 <= seed < 2**63)):
        if not ok:
            raise ValueError(f"{who}: invalid {name}={v!r}")


def _check_output_width(model: nn.Module, x1: Tensor, targets: int) -> None:
    """One row through the model (eval, no grad) before training: a model whose output does
    not match y's columns would train on a broadcast loss, silently."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x1)
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != targets:
        got = f"output of shape {list(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise ValueError(f"aiaas_fast.fit: y has {targets} column(s), but the model gives {got} for a batch of "
                         f"shape {list(x1.shape)}; it must give (rows, {targets})")


def predict(model: nn.Module, X, batch_size: int = 4096) -> Tensor:
    """The model's predictions in the targets' units, using the scalers ``fit`` kept."""
    x = _as_tensor("X", X, "aiaas_fast.predict")
    scalers = getattr(model, "aiaas_fast_scalers", None)
    if scalers:
        _check_feature_count("aiaas_fast.predict", X, x, scalers["x"].mean.shape[-1], "the model was fitted on")
    first = next(model.parameters())
    device, dtype = first.device, first.dtype if first.is_floating_point() else torch.float32
    outs = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]  # scaled on the CPU, in float64 (a device may have none: MPS)
            xb = (scalers["x"].transform(xb, dtype) if scalers else xb.to(dtype)).to(device)
            out = model(xb).cpu()
            outs.append(scalers["y"].inverse(out) if scalers else out)
    model.train(was_training)
    return torch.cat(outs).cpu() if outs else torch.empty(0, 0)


def fit(model: nn.Module, X, y=None, *, epochs: int = 100, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 0.0, val_split: float = 0.2, seed: int = 0, standardize: bool = True,
        patience: Optional[int] = None, min_delta: float = 0.0, checkpoint: Optional[str] = None,
        resume: bool = False, progress: Optional[bool] = None, optimizer=None, loss_fn=None,
        distributed: Optional[bool] = None, engine: str = "auto") -> History:
    """Trains ``model`` in place and returns its :class:`History`.

    ``X``, ``y``: tensors or NumPy arrays (rows, features) and (rows,) or (rows, targets); or
    ``X`` a DataLoader of (x, y) batches and ``y`` None. ``val_split`` of the rows (shuffled by
    ``seed``) are held out for validation. ``patience``: stop after that many epochs without a
    validation-loss improvement larger than ``min_delta``, keeping the best weights.
    ``checkpoint``: a file written after every epoch; with ``resume=True`` a run continues from
    it (model, optimizer, scalers, epoch, RNG states), to the same result as an uninterrupted run.
    ``optimizer`` / ``loss_fn``: defaults ``aiaas_fast.optim.Adam(lr, weight_decay)`` and
    ``aiaas_fast.nn.MSELoss()``; any torch optimizer and mean-reduced loss work (``lr`` is then
    the optimizer's).

    ``engine``: ``"auto"`` (default) runs each epoch in the compiled C++ engine
    (:mod:`aiaas_fast.engine`) when it supports the model, optimizer and loss (an MLP of
    Linear/ReLU on the CPU in float32, Adam/AdamW, mean MSE, one process), else op by op;
    ``"compiled"`` insists (an error says why it cannot); ``"ops"`` never uses it. Both paths
    see the same batches in the same order; ``History.engine`` says which ran.

    Distributed: under ``torchrun`` (or with a process group already initialised;
    ``distributed=None`` decides from the environment) the model is wrapped in
    DistributedDataParallel (gloo on CPU, NCCL on GPU), ``batch_size`` is per process, and
    each global batch of ``batch_size * world_size`` rows is split among the processes, so the
    run equals a single process with the global batch size. Rank 0 writes the checkpoint.
    """
    if resume and not checkpoint:
        raise ValueError("aiaas_fast.fit: resume=True needs checkpoint= (the file to continue from)")
    if isinstance(X, torch.utils.data.DataLoader):
        if y is not None:
            raise ValueError("aiaas_fast.fit: with a DataLoader, pass y=None (the loader yields (x, y))")
        X, y = _from_loader(X)
    elif y is None:
        raise ValueError("aiaas_fast.fit: y is missing")
    x_all, y_all = _as_tensor("X", X), _as_tensor("y", y)
    if len(x_all) != len(y_all):
        raise ValueError(f"aiaas_fast.fit: X has {len(x_all)} rows but y has {len(y_all)}")
    if len(x_all) == 0:
        raise ValueError("aiaas_fast.fit: no rows to train on")
    _check_hyperparameters("aiaas_fast.fit", epochs, batch_size, lr, val_split, patience, min_delta, seed)
    epochs, batch_size, seed, min_delta = int(epochs), int(batch_size), int(seed), float(min_delta)
    params = list(model.parameters())
    if not params:
        raise ValueError("aiaas_fast.fit: the model has no parameters")
    device = params[0].device
    world, rank, train_model = 1, 0, model
    if distributed is None:
        distributed = (torch.distributed.is_available() and (torch.distributed.is_initialized()
                       or int(os.environ.get("WORLD_SIZE", "1")) > 1))
    if distributed:
        dist = torch.distributed
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # The split and the scalers depend only on the data and the seed, so a resumed run
    # rebuilds exactly the ones it had.
    split_gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_all), generator=split_gen)
    n_val = int(round(len(x_all) * val_split))
    if val_split > 0 and (n_val == 0 or n_val == len(x_all)):
        raise ValueError(f"aiaas_fast.fit: val_split={val_split} leaves {len(x_all) - n_val} training and {n_val} "
                         f"validation rows out of {len(x_all)}; use more rows or another val_split")
    train_idx, val_idx = order[n_val:], order[:n_val]
    x_tr, y_tr, x_va, y_va = x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]
    if standardize:
        scalers = {"x": Scaler.fit(x_tr), "y": Scaler.fit(y_tr)}
    else:
        scalers = {"x": Scaler(torch.zeros(x_tr.shape[1]), torch.ones(x_tr.shape[1])),
                   "y": Scaler(torch.zeros(y_tr.shape[1]), torch.ones(y_tr.shape[1]))}
    dtype = params[0].dtype if params[0].is_floating_point() else torch.float32  # the model's (float64 too)
    xs_tr, ys_tr = (scalers[k].transform(v, dtype).to(device) for k, v in (("x", x_tr), ("y", y_tr)))
    xs_va, ys_va = (scalers[k].transform(v, dtype).to(device) for k, v in (("x", x_va), ("y", y_va)))
    if loss_fn is None or isinstance(loss_fn, nn.MSELoss):  # a custom loss may take other shapes (quantiles)
        _check_output_width(model, xs_tr[:1], ys_tr.shape[1])

    loss_fn = loss_fn if loss_fn is not None else MSELoss()
    if optimizer is not None:
        _check_optimizer_holds_the_model(optimizer, model)
    opt = optimizer if optimizer is not None else Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle_gen = torch.Generator().manual_seed(seed + 1)
    history = History()
    best_loss, best_state, bad_epochs, start_epoch = math.inf, None, 0, 0

    if engine not in ("auto", "compiled", "ops"):
        raise ValueError(f"aiaas_fast.fit: engine must be 'auto', 'compiled' or 'ops', got {engine!r}")

    if resume and checkpoint and os.path.exists(checkpoint):
        ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"aiaas_fast.fit: {checkpoint} is not an aiaas_fast.fit checkpoint")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        shuffle_gen.set_state(ckpt["shuffle_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        history = ckpt["history"]
        best_loss, best_state, bad_epochs = ckpt["best_loss"], ckpt["best_state"], ckpt["bad_epochs"]
        start_epoch = ckpt["epoch"] + 1

    # The engine shares the optimizer's state tensors, so it is built after a resume has loaded them.
    compiled, engine_note = None, ""
    if engine != "ops":
        from .engine import Engine, auto_reason, unsupported_reason

        why = unsupported_reason if engine == "compiled" else auto_reason
        engine_note = ("distributed training runs op by op under DDP" if world > 1
                       else why(model, opt, loss_fn) or "")
        if not engine_note:
            compiled = Engine(model, opt)
        elif engine == "compiled":
            raise ValueError(f"aiaas_fast.fit: engine='compiled' cannot train this model: {engine_note}")
    history.engine, history.engine_note = ("compiled", compiled.description) if compiled is not None else ("ops", engine_note)
    logging.getLogger("aiaas_fast").info("aiaas_fast.fit: %s engine%s", history.engine,
                                         f" ({engine_note})" if engine_note else "")

    bar = _progress(progress, epochs, f"aiaas_fast.fit ({history.engine})") if rank == 0 else None
    if bar is not None:
        bar.update(start_epoch)
    model.train()
    global_batch = batch_size * world
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(xs_tr), generator=shuffle_gen).to(device)
        if compiled is not None:  # the same batches, in C++: one call for the epoch
            total = float(compiled.run(xs_tr, ys_tr, epochs=1, batch_size=batch_size, shuffle=False, rows=perm)[0])
            total *= len(perm)
        else:
            total = 0.0
            for i in range(0, len(perm), global_batch):
                batch = perm[i:i + global_batch]
                idx = torch.tensor_split(batch, world)[rank] if world > 1 else batch
                opt.zero_grad(set_to_none=True)
                pred = train_model(xs_tr[idx])
                if world > 1:
                    # DDP averages gradients over processes; weighting each process's mean loss by
                    # its share of the global batch makes that average the global batch's mean, even
                    # for a last batch that does not split evenly (or leaves a process no rows).
                    share = len(idx) * world / len(batch)
                    loss = loss_fn(pred, ys_tr[idx]) * share if len(idx) else pred.sum() * 0.0
                else:
                    loss = loss_fn(pred, ys_tr[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(batch) / world if world > 1 else loss.item() * len(idx)
        if world > 1:
            summed = torch.tensor([total], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(summed)
            total = summed.item()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "train_loss": total / len(perm), "seconds": seconds,
                  "samples_per_s": len(perm) / seconds if seconds > 0 else float("inf")}
        if n_val:
            model.eval()
            with torch.no_grad():
                pred = model(xs_va)
                record["val_loss"] = loss_fn(pred, ys_va).item()
                record.update(_metrics(scalers["y"].inverse(pred).cpu(), y_va))
            model.train()
        history.epochs.append(record)
        monitored = record.get("val_loss", record["train_loss"])
        if monitored < best_loss - min_delta:
            best_loss, bad_epochs, history.best_epoch = monitored, 0, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if patience else None
        else:
            bad_epochs += 1
        if bar is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", val=f"{record.get('val_loss', float('nan')):.4g}",
                            samples_s=f"{record['samples_per_s']:.0f}")
            bar.update(1)
        stop = patience is not None and bad_epochs >= patience
        if checkpoint and rank == 0:
            tmp = checkpoint + ".tmp"
            torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scalers": {k: s.state_dict() for k, s in scalers.items()}, "epoch": epoch,
                        "history": history, "shuffle_rng": shuffle_gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "best_loss": best_loss, "best_state": best_state, "bad_epochs": bad_epochs}, tmp)
            os.replace(tmp, checkpoint)  # never a half-written checkpoint
        if stop:
            history.stopped_early = True
            break
    if bar is not None:
        bar.close()
    if history.stopped_early and best_state is not None:
        model.load_state_dict(best_state)
    model.aiaas_fast_scalers = scalers
    return history
