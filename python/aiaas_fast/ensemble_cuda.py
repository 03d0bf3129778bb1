"""Many models at once on CUDA: K MLPs of one shape (an :class:`aiaas_fast.Ensemble`) trained
by batched products, each step one CUDA graph launch.

A step runs all K models on a padded (K, batch, features) block: ``torch.baddbmm`` forward,
the MSE and its gradient, the backward by ``torch.bmm`` with the ReLU masks, and one Adam
update over the K models' parameters. Each model trains on its own rows (its group's, or its
bootstrap sample) in its own shuffled order, so models hold different numbers of rows: a row
mask leaves out the padding of a model's last, partial batch, and a model with no rows left
in an epoch sits that step out (its Adam state and step count stay as they are), as on the
C++ engine. Everything a step needs stays on the device: the epoch's orders (drawn on the
device, one sort for all K models), a position counter, the row masks and the loss totals,
so ``run()`` is one graph replay per step from Python, whatever K is.

Same API as the C++ engine's many-model form (``aiaas_fast._C.MLPEngine``): ``step``,
``run``, ``predict``; :func:`aiaas_fast.ensemble.ensemble_engine` picks one by device.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .engine_cuda import MAX_STEP_GRAPHS, GraphCapture, needs_new_capture

__all__ = ["CudaEnsembleEngine"]

WHO = "aiaas_fast.EnsembleEngine"


class CudaEnsembleEngine(GraphCapture):
    """weights: per layer (K, out, in); biases: per layer (K, out); hidden layers ReLU, the
    last linear. Adam (L2 ``weight_decay``, or AdamW with ``decoupled_weight_decay``) with
    float32 moments and a step count per model, all owned here: ``exp_avg``, ``exp_avg_sq``
    and ``grad`` are (K, P) with P the parameters of one model, and ``state`` gives each
    parameter tensor's views of them, as (exp_avg, exp_avg_sq, steps)."""

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor], *, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, decoupled_weight_decay: bool = False):
        if len(weights) == 0 or len(weights) != len(biases):
            raise ValueError(f"{WHO}: needs one bias per weight, got {len(weights)} weights and {len(biases)} biases")
        self.weights, self.biases = list(weights), list(biases)
        self.params = [p for pair in zip(self.weights, self.biases) for p in pair]
        w0 = self.weights[0]
        self.device, self.K = w0.device, w0.shape[0]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.dim() != 3 or b.shape != (self.K, w.shape[1]) or w.shape[0] != self.K:
                raise ValueError(f"{WHO}: layer {i}: weight must be (K, out, in) and bias (K, out) with K={self.K}; "
                                 f"got {list(w.shape)} and {list(b.shape)}")
            if i and w.shape[2] != self.weights[i - 1].shape[1]:
                raise ValueError(f"{WHO}: layer {i} takes {w.shape[2]} features but layer {i - 1} gives "
                                 f"{self.weights[i - 1].shape[1]}")
        for p in self.params:
            if p.device != self.device or p.dtype != torch.float32 or not p.is_contiguous():
                raise ValueError(f"{WHO}: parameters must be contiguous float32 on one device; got {p.dtype} "
                                 f"on {p.device}{'' if p.is_contiguous() else ', not contiguous'}")
        self.widths = [w0.shape[2]] + [w.shape[1] for w in self.weights]
        self.in_features, self.out_features = self.widths[0], self.widths[-1]
        flat = dict(device=self.device, dtype=torch.float32)
        self.exp_avg = torch.zeros(self.K, sum(p[0].numel() for p in self.params), **flat)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.grad = torch.zeros_like(self.exp_avg)
        self.steps = torch.zeros(self.K, **flat)
        views = self._views
        self._grads, self._exp_avgs, self._exp_avg_sqs = views(self.grad), views(self.exp_avg), views(self.exp_avg_sq)
        self.state = [(m, v, self.steps) for m, v in zip(self._exp_avgs, self._exp_avg_sqs)]
        self._lr = torch.zeros((), dtype=torch.float32, device=self.device)  # read by the graphs
        self.hyper: Optional[dict] = None
        self._step_graphs: dict = {}  # batch size -> (replay, x, y, loss)
        self._run_key = None  # run()'s graph: for which data, rows and sizes
        self.set_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                 amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)

    def set_hyperparameters(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                            amsgrad: bool = False, maximize: bool = False, decoupled_weight_decay: bool = False) -> None:
        if amsgrad:
            raise ValueError(f"{WHO}: amsgrad is not supported for many models on CUDA")
        for name, v, ok in (("lr", lr, lr >= 0), ("beta1", beta1, 0 <= beta1 < 1), ("beta2", beta2, 0 <= beta2 < 1),
                            ("eps", eps, eps >= 0), ("weight_decay", weight_decay, weight_decay >= 0)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and ok):
                raise ValueError(f"{WHO}: invalid {name}={v!r}")
        hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                     weight_decay=float(weight_decay), maximize=bool(maximize),
                     decoupled_weight_decay=bool(decoupled_weight_decay))
        if hyper == self.hyper:
            return
        if needs_new_capture(self.hyper, hyper):  # the other scalars are baked into the launches
            self._drop_graphs()
        self.hyper = hyper
        self._lr.fill_(hyper["lr"])  # in stream order: the next replay reads it

    def _tensors(self) -> List[Tensor]:
        return self.params + [self.exp_avg, self.exp_avg_sq, self.steps]

    def _drop_graphs(self) -> None:
        self._step_graphs = {}
        self._run_key = None

    # -- the step body, captured into the graphs
    def _forward(self, x: Tensor) -> List[Tensor]:
        """x (K, rows, in) -> every layer's input and the output (K, rows, out)."""
        hs = [x]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(b.unsqueeze(1), hs[-1], w.transpose(1, 2))
            hs.append(z.relu_() if i < last else z)
        return hs

    @torch.no_grad()
    def _train(self, x: Tensor, y: Tensor, valid: Tensor, count: Tensor) -> Tensor:
        """One step of every model on its block of rows: x (K, B, in), y (K, B, out), valid (K, B)
        the real rows (padding rows are ignored), count (K,) the real rows per model. Returns
        the models' mean losses (K,); a model with no rows has loss 0 and does not step."""
        hs = self._forward(x)
        diff = (hs[-1] - y) * valid.unsqueeze(2)
        per_model = (count * self.out_features).clamp(min=1)
        loss = diff.square().sum(dim=(1, 2)) / per_model
        dz = diff * (2.0 / per_model).view(-1, 1, 1)  # dL/d(output) of the mean per model
        for i in range(len(self.weights) - 1, -1, -1):
            self._grads[2 * i].copy_(torch.bmm(dz.transpose(1, 2), hs[i]))
            self._grads[2 * i + 1].copy_(dz.sum(dim=1))
            if i:
                dz = torch.bmm(dz, self.weights[i]) * ~(hs[i] <= 0)  # ReLU of the layer below (NaN passes, as torch)
        self._adam(count > 0)
        return loss

    def _adam(self, active: Tensor) -> None:
        """torch.optim.Adam's update for the models in ``active`` (K,), on the flat state; the
        others keep their parameters, moments and step count."""
        h = self.hyper
        a = active.to(torch.float32)
        self.steps.add_(a)
        g = self.grad
        l2 = h["weight_decay"] and not h["decoupled_weight_decay"]
        if h["maximize"] or l2:  # on a copy: the gradients stay what the loss gave
            g = g.neg() if h["maximize"] else g.clone()
            if l2:
                for gv, p in zip(self._views(g), self.params):
                    gv.add_(p, alpha=h["weight_decay"])
        a1 = (a * (1 - h["beta1"])).unsqueeze(1)
        a2 = (a * (1 - h["beta2"])).unsqueeze(1)
        self.exp_avg.lerp_(g, a1)
        self.exp_avg_sq.mul_(1 - a2).addcmul_(g.square(), a2)
        # Bias corrections per model; a model that has never stepped gets finite placeholders
        # (its update is multiplied by 0).
        started = self.steps > 0
        one = torch.ones_like(self.steps)
        bc1 = torch.where(started, 1 - torch.pow(h["beta1"], self.steps), one)
        bc2 = torch.where(started, 1 - torch.pow(h["beta2"], self.steps), one)
        step_size = (a * self._lr / bc1).unsqueeze(1)
        denom = (self.exp_avg_sq.sqrt() / bc2.sqrt().unsqueeze(1)).add_(h["eps"])
        update = self.exp_avg / denom * step_size
        shrink = (1 - a * self._lr * h["weight_decay"]) if h["weight_decay"] and h["decoupled_weight_decay"] else None
        for p, u in zip(self.params, self._views(update)):
            if shrink is not None:
                p.mul_(shrink.view(-1, *[1] * (p.dim() - 1)))
            p.sub_(u)

    def _views(self, flat: Tensor) -> List[Tensor]:
        """Each parameter tensor's (K, ...) view of a flat (K, P) buffer."""
        out, start = [], 0
        for p in self.params:
            n = p[0].numel()
            out.append(flat[:, start:start + n].view(p.shape))
            start += n
        return out

    # -- inputs
    def _matrix(self, t: Tensor, name: str, cols: int, allow_models: bool, move: bool = True) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"{WHO}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise RuntimeError(f"{WHO}: {name} must be float32, got {t.dtype}")
        m = t.unsqueeze(1) if t.dim() == 1 and cols == 1 else t
        if not (m.dim() == 2 or (allow_models and m.dim() == 3)):
            want = "(batch, features) or (models, batch, features)" if allow_models else "(rows, features)"
            raise RuntimeError(f"{WHO}: {name} must be {want}, got shape {list(t.shape)}")
        if m.shape[-1] != cols:
            raise RuntimeError(f"{WHO}: {name} has {m.shape[-1]} columns (shape {list(t.shape)}) but the model "
                               f"{'takes' if name[0] == 'x' else 'gives'} {cols}")
        if m.dim() == 3 and m.shape[0] != self.K:
            raise RuntimeError(f"{WHO}: {name} holds {m.shape[0]} models in dim 0 (shape {list(t.shape)}) but the "
                               f"engine trains {self.K}")
        return m.to(self.device, non_blocking=True) if move else m

    # -- one step of every model on one batch (shared, or one per model)
    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """x (batch, in) for every model or (K, batch, in) one per model, y likewise; returns
        the K losses (float64, CPU)."""
        x = self._matrix(x, "x", self.in_features, True)
        y = self._matrix(y, "y", self.out_features, True)
        batch = x.shape[-2]
        if batch < 1:
            raise RuntimeError(f"{WHO}.step: x has no rows")
        if y.shape[-2] != batch:
            raise RuntimeError(f"{WHO}.step: x has {batch} rows but y has {y.shape[-2]}")
        self._follow_precision()
        entry = self._step_graphs.get(batch)
        if entry is None and len(self._step_graphs) >= MAX_STEP_GRAPHS:  # each holds a memory pool
            self._step_graphs.pop(next(iter(self._step_graphs)))
        if entry is None:
            xs = torch.zeros(self.K, batch, self.in_features, device=self.device)
            ys = torch.zeros(self.K, batch, self.out_features, device=self.device)
            valid = torch.ones(self.K, batch, device=self.device)
            count = torch.full((self.K,), float(batch), device=self.device)
            with torch.no_grad():
                replay, loss = self._capture_without_training(lambda: self._train(xs, ys, valid, count))
            entry = self._step_graphs[batch] = (replay, xs, ys, loss)
        replay, xs, ys, loss = entry
        xs.copy_(x.expand_as(xs))
        ys.copy_(y.expand_as(ys))
        replay()
        return loss.to("cpu", torch.float64)

    # -- whole runs: each model on its own rows, in its own order
    def _run_graph(self, X: Tensor, Y: Tensor, table: Tensor, counts: Tensor, batch: int, steps_in_epoch: int):
        """run()'s graph for (X, Y) and these rows: one step of all K models, gathering each
        model's batch by its order at a position counter, advancing the counter and adding
        the rows and losses to the epoch's totals, all inside the graph. Rebuilt when the data,
        the rows or the sizes change."""
        key = (X.data_ptr(), Y.data_ptr(), tuple(X.shape), tuple(Y.shape), table.shape, batch,
               tuple(counts.tolist()))
        if self._run_key == key:
            return self._run_entry
        K, dev = self.K, self.device
        # Room past the last step for the capture's warm-up calls, which advance the counter too.
        order = torch.zeros(K, steps_in_epoch * batch + 2 * batch, dtype=torch.int64, device=dev)
        pos = torch.zeros((), dtype=torch.int64, device=dev)
        total = torch.zeros(K, dtype=torch.float64, device=dev)
        seen = torch.zeros(K, dtype=torch.float64, device=dev)
        xs = torch.zeros(K * batch, self.in_features, device=dev)
        ys = torch.zeros(K * batch, self.out_features, device=dev)
        offsets = torch.arange(batch, device=dev)
        rows = counts.to(dev)

        def body():
            cols = offsets + pos
            idx = order.index_select(1, cols).view(-1)
            valid = cols.unsqueeze(0) < rows.unsqueeze(1)  # (K, B): past a model's rows is padding
            count = valid.sum(dim=1).to(torch.float32)
            torch.index_select(X, 0, idx, out=xs)
            torch.index_select(Y, 0, idx, out=ys)
            loss = self._train(xs.view(K, batch, -1), ys.view(K, batch, -1), valid.to(torch.float32), count)
            total.add_(loss.double() * count)
            seen.add_(count)
            pos.add_(batch)
            return loss

        with torch.no_grad():
            replay = self._capture_without_training(body)[0]
        self._run_key, self._run_entry = key, (replay, order, pos, total, seen)
        return self._run_entry

    def epoch_orders(self, table: Tensor, counts: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Each model's rows for one epoch, (K, max rows): row k holds model k's rows, shuffled
        with ``generator`` (a generator on the engine's device; None keeps the given order),
        then padding. One sort on the device for all K models."""
        if generator is None:
            return table
        keys = torch.rand(table.shape, generator=generator, device=self.device)
        keys.masked_fill_(torch.arange(table.shape[1], device=self.device) >= counts.unsqueeze(1), 2.0)
        return table.gather(1, keys.argsort(dim=1, stable=True))

    def run(self, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, seed: int = 0, shuffle: bool = True,
            callback_every: int = 0, sample_index: Optional[Tensor] = None, sample_offsets: Optional[Tensor] = None,
            callback: Optional[Callable] = None) -> Tensor:
        """Epochs of every model over its rows (``sample_index[sample_offsets[k]:sample_offsets[k + 1]]``,
        or all rows), in mini-batches, shuffled each epoch from ``seed`` (on the device's
        generator: the same seed gives the same orders on the same kind of device). Returns
        the per-epoch mean losses, (epochs run, K) float64. ``callback(epoch, step,
        steps_in_epoch, epoch_end, losses)`` every ``callback_every`` steps and at each epoch's
        end, losses the K means so far this epoch; a true return stops the run."""
        X = self._staged(self._matrix(x, "x", self.in_features, False, move=False), "x").contiguous()
        Y = self._staged(self._matrix(y, "y", self.out_features, False, move=False), "y").contiguous()
        n = X.shape[0]
        if Y.shape[0] != n:
            raise RuntimeError(f"{WHO}.run: x has {n} rows but y has {Y.shape[0]}")
        for name, v, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("callback_every", callback_every, 0)):
            if not isinstance(v, int) or v < low:
                raise RuntimeError(f"{WHO}.run: {name} must be an int >= {low}, got {v!r}")
        table, counts = self._rows(n, sample_index, sample_offsets)
        batch_size = min(batch_size, int(counts.max()))  # buffers follow the rows, not the number asked for
        steps_in_epoch = int((counts.max() + batch_size - 1) // batch_size)
        self._follow_precision()
        replay, order, pos, total, seen = self._run_graph(X, Y, table, counts, batch_size, steps_in_epoch)
        gen = torch.Generator(device=self.device).manual_seed(int(seed)) if shuffle else None
        cols = table.shape[1]
        losses: List[Tensor] = []
        for epoch in range(epochs):
            order[:, :cols].copy_(self.epoch_orders(table, counts, gen))
            pos.zero_()
            total.zero_()
            seen.zero_()
            stop = False
            for s in range(steps_in_epoch):
                replay()
                done = s + 1
                at_end = done == steps_in_epoch
                if callback is not None and (at_end or (callback_every and done % callback_every == 0)):
                    so_far = (total / seen).cpu()  # NaN for a model with no rows yet
                    if callback(epoch, done, steps_in_epoch, at_end, so_far.tolist()):
                        stop = True
                        if not at_end:
                            losses.append(so_far)
                            break
            else:
                losses.append((total / seen).cpu())
            if stop:
                break
        return torch.stack(losses) if losses else torch.zeros(0, self.K, dtype=torch.float64)

    def _rows(self, n: int, sample_index: Optional[Tensor], sample_offsets: Optional[Tensor]):
        """(table (K, max rows) int64 on the device, padded with row 0; counts (K,) int64)."""
        K = self.K
        if sample_index is None:
            if n < 1:
                raise RuntimeError(f"{WHO}.run: x has no rows")
            return (torch.arange(n, device=self.device).expand(K, n).contiguous(),
                    torch.full((K,), n, dtype=torch.int64, device=self.device))
        idx, offs = torch.as_tensor(sample_index), torch.as_tensor(sample_offsets)
        if idx.dim() != 1 or idx.dtype != torch.int64:
            raise RuntimeError(f"{WHO}.run: sample_index must be a 1-D int64 tensor")
        if offs.dim() != 1 or offs.dtype != torch.int64 or len(offs) != K + 1:
            raise RuntimeError(f"{WHO}.run: sample_offsets must be a 1-D int64 tensor of {K + 1} elements (models + 1)")
        offs, idx = offs.cpu(), idx.cpu()
        if offs[0] != 0 or offs[-1] != len(idx):
            raise RuntimeError(f"{WHO}.run: sample_offsets must start at 0 and end at {len(idx)} (the length of "
                               "sample_index)")
        counts = offs[1:] - offs[:-1]
        for k in range(K):
            if counts[k] <= 0:
                raise RuntimeError(f"{WHO}.run: model {k} has no rows (sample_offsets[{k}] = {int(offs[k])}, "
                                   f"sample_offsets[{k + 1}] = {int(offs[k + 1])})")
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            at = int(bad.nonzero()[0])
            k = int((offs[1:] <= at).sum())
            raise RuntimeError(f"{WHO}.run: sample_index holds row {int(idx[at])} for model {k}, but x has {n} rows")
        table = torch.zeros(K, int(counts.max()), dtype=torch.int64)
        within = torch.arange(len(idx)) - offs[:-1].repeat_interleave(counts)
        table[torch.arange(K).repeat_interleave(counts), within] = idx
        return table.to(self.device), counts.to(self.device)

    def predict(self, x: Tensor) -> Tensor:
        """Every model on every row of x (rows, in): (K, rows, out) on the engine's device."""
        X = self._matrix(x, "x", self.in_features, False)
        chunk = max(256, (1 << 24) // (self.K * max(self.widths)))  # activations of 64 MB at most
        out = torch.empty(self.K, X.shape[0], self.out_features, device=self.device)
        with torch.no_grad():
            for r in range(0, X.shape[0], chunk):
                part = X[r:r + chunk]
                out[:, r:r + chunk] = self._forward(part.expand(self.K, *part.shape))[-1]
        return out

    def last_gradients(self) -> List[Tensor]:
        """The last step's gradients, per parameter tensor (weight, bias per layer): for tests."""
        return [g.clone() for g in self._grads]
