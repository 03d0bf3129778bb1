"""The training engine on CUDA: the whole step (forward on the fused ops, MSE, backward, the
multi-tensor Adam with its step counters on the device) captured once in a CUDA graph per
batch size and replayed, so a step costs one graph launch instead of dozens of kernel
launches and the autograd engine's Python and C++ work.

Two bodies for the graph (``path``):

- ``"fused"``: for widths up to 128, forward, loss and backward in one Triton kernel that
  keeps each row tile on chip (:mod:`aiaas_fast.triton.fused_mlp`), above 64 rows one
  kernel that sums the programs' partial gradients, then Adam: three or four kernels a step;
- ``"graph"``: the fused ops (``linear_relu``, ``mse_loss``) with autograd's backward, any width.

``"auto"`` takes the first that fits. Used by :class:`aiaas_fast.engine.Engine` for a model
on a CUDA device; same API.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import ops
from ._tf32 import cuda_matmul_allows_tf32
from .engine import UnsupportedModel

__all__ = ["CudaGraphEngine", "GraphCapture", "fused_reason", "needs_new_capture"]

PATHS = ("auto", "fused", "graph")
#: step() keeps a graph per batch size; past this many, the oldest goes.
MAX_STEP_GRAPHS = 8


def fused_reason(layers) -> Optional[str]:
    """Why the fused MLP kernel cannot train these layers here (None: it can)."""
    try:
        from .triton import fused_mlp
    except ImportError as e:
        return f"the fused MLP kernel needs Triton ({e})"
    return fused_mlp.unsupported_reason(layers)


def needs_new_capture(old: Optional[dict], new: dict) -> bool:
    """Whether graphs captured with hyperparameters ``old`` are stale under ``new``: any change
    but the learning rate's, which the graphs read from a device scalar."""
    return old is None or old.keys() != new.keys() or any(new[k] != old[k] for k in new if k != "lr")


def _adam(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, hyper: dict, lr: Tensor) -> None:
    """One Adam step whose every input stays on the device (capturable), the learning rate
    included: ``lr`` is a device scalar, so a scheduler's change is a write to it, not a new
    capture. PyTorch's fused Adam/AdamW kernels take a tensor lr (aiaas_fast's adam_ takes
    a float, which a captured graph would freeze)."""
    torch._foreach_add_(steps, 1)  # torch's fused kernels read the step; the optimizer increments it
    fused = torch._fused_adamw_ if hyper["decoupled_weight_decay"] else torch._fused_adam_
    fused(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, lr=lr, beta1=hyper["beta1"], beta2=hyper["beta2"],
          weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=hyper["amsgrad"], maximize=hyper["maximize"])


class GraphCapture:
    """Capture of a step body in a CUDA graph, for an engine with ``device`` and ``_tensors()``
    (everything a step writes: parameters, optimizer state, step counters)."""

    device: torch.device
    _tf32: Optional[bool] = None  # torch's TF32 setting when the graphs were captured

    def _tensors(self) -> List[Tensor]:
        raise NotImplementedError

    def _staged(self, t: Tensor, name: str) -> Tensor:
        """run()'s data on the engine's GPU. run()'s graphs keep the address of the data they
        gather from; data from elsewhere (the CPU) is copied into a buffer kept between calls,
        so that the next call with data of the same shape replays them instead of capturing
        new ones (a new copy each call would be a new address: a capture every call)."""
        if t.device == self.device:
            return t
        staged = self.__dict__.setdefault("_staged_data", {})
        buf = staged.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = staged[name] = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        buf.copy_(t)
        return buf

    def _drop_graphs(self) -> None:
        raise NotImplementedError

    def _follow_precision(self) -> None:
        """A graph freezes torch's TF32 setting for float32 products at capture (the fused
        kernel's dot precision, cuBLAS's math mode): after a change, capture again."""
        tf32 = cuda_matmul_allows_tf32()
        if self._tf32 is not None and tf32 != self._tf32:
            self._drop_graphs()
        self._tf32 = tf32

    def _capture_without_training(self, body: Callable[[], Tensor]):
        # Capture needs warm-up (lazy initialisation, cuBLAS workspaces, autotuning), and the
        # warm-up must not train: it runs on the live state, which is restored afterwards.
        saved = [t.detach().clone() for t in self._tensors()]
        replay, out = self._capture(body)
        with torch.no_grad():
            for t, s in zip(self._tensors(), saved):
                t.copy_(s)
        return replay, out

    def _capture(self, body: Callable[[], Tensor]):
        """Captures ``body`` in a CUDA graph; returns (replay, the graph's output tensor).

        The replay holds the body, and with it every tensor the graph reads or writes: a
        graph keeps addresses, not tensors, so a static input freed after the capture would
        go to the next allocation and the replays would read and write someone else's memory."""
        graph, out = self._record(body)

        def replay(graph=graph, body=body):
            graph.replay()
        return replay, out

    def _record(self, body: Callable[[], Tensor]):
        """Warms ``body`` up on a side stream of the model's GPU and captures it there;
        returns (graph, output). The capture stream is given: torch's default capture stream
        lives on whichever GPU was current at the process's first capture."""
        with torch.cuda.device(self.device):  # the capture (and Triton's launches) on the model's GPU
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                out = body()
        return graph, out


class CudaGraphEngine(GraphCapture):
    """layers: [(nn.Linear, relu)]; state: per parameter dicts with exp_avg, exp_avg_sq
    (max_exp_avg_sq) on the device and step (any device: kept in step on the device here and
    written back after every call)."""

    def __init__(self, layers, params: List[Tensor], state: List[dict], hyper: dict, path: str = "auto"):
        if path not in PATHS:
            raise ValueError(f"aiaas_fast.Engine: path on CUDA is one of {', '.join(PATHS)}; got {path!r}")
        self.layers, self.params, self.state, self.hyper = layers, params, state, dict(hyper)
        self.fused = None
        if path != "graph":
            why = fused_reason(layers)
            if why is None:
                from .triton.fused_mlp import FusedMLP

                self.fused = FusedMLP(layers)
                assert all(a is b for a, b in zip(self.fused.params, params)) and len(self.fused.params) == len(params)
            elif path == "fused":
                raise UnsupportedModel(f"aiaas_fast.Engine(path='fused'): {why}")
        #: What the captured step runs: "fused" (the fused MLP kernel) or "graph" (the fused ops).
        self.path = "fused" if self.fused is not None else "graph"
        self.device = params[0].device
        self.in_features, self.out_features = layers[0][0].in_features, layers[-1][0].out_features
        self.steps = [torch.tensor(float(s["step"]), dtype=torch.float32, device=self.device) for s in state]
        self._graphs: Dict[int, tuple] = {}  # batch size -> (replay, x, y, loss, grads): static buffers
        self._captured_grads: List[Tensor] = []  # the gradients the body computed last (its graph's, after a capture)
        self._last_grads: Optional[List[Tensor]] = None  # those of the graph replayed last
        self._run_key = None  # run()'s graphs: for which data and sizes (_run_graphs)
        # float32: torch's fused kernels read a tensor lr as float
        self._lr = torch.tensor(float(hyper["lr"]), dtype=torch.float32, device=self.device)

    # -- the step body, traced once per batch size into a graph
    def _forward(self, x: Tensor) -> Tensor:
        h = x
        for lin, relu in self.layers:
            h = ops.linear_relu(h, lin.weight, lin.bias) if relu else nn.functional.linear(h, lin.weight, lin.bias)
        return h

    def _body(self, x: Tensor, y: Tensor) -> Tensor:
        if self.fused is not None:
            loss, grads = self.fused.loss_and_grads(x, y), self.fused.grads
        else:
            with torch.enable_grad():
                loss = ops.mse_loss(self._forward(x), y)
                grads = torch.autograd.grad(loss, self.params)
        self._captured_grads = list(grads)
        with torch.no_grad():
            max_sqs = [s["max_exp_avg_sq"] for s in self.state] if self.hyper["amsgrad"] else []
            _adam(self.params, list(grads), [s["exp_avg"] for s in self.state], [s["exp_avg_sq"] for s in self.state],
                  max_sqs, self.steps, self.hyper, self._lr)
        return loss.detach()

    def _graph(self, batch: int):
        """step()'s graph for this batch size: (replay, static x, static y, loss, gradients)."""
        entry = self._graphs.get(batch)
        if entry is not None:
            return entry
        if len(self._graphs) >= MAX_STEP_GRAPHS:  # each graph holds a memory pool: keep the newest
            self._graphs.pop(next(iter(self._graphs)))
        x = torch.zeros(batch, self.in_features, device=self.device)
        y = torch.zeros(batch, self.out_features, device=self.device)
        replay, loss = self._capture_without_training(lambda: self._body(x, y))
        entry = self._graphs[batch] = (replay, x, y, loss, self._captured_grads)
        return entry

    def _run_graphs(self, X: Tensor, Y: Tensor, n: int, batch: int):
        """run()'s graphs for (X, Y): one step each, gathering its batch from X and Y by the
        epoch's row order (a static buffer) at a position counter on the device, advancing the
        counter and adding batch x loss to the epoch's total, all inside the graph, so a
        step is one graph launch from Python. A graph for the full batch and one for the
        last, partial batch; rebuilt when X, Y or the sizes change."""
        key = (X.data_ptr(), Y.data_ptr(), tuple(X.shape), tuple(Y.shape), n, batch)
        if self._run_key == key:
            return self._run_entry
        # Room past the order's end for the capture's warm-up calls, which advance the counter too.
        order = torch.zeros(n + 2 * batch, dtype=torch.int64, device=self.device)
        pos = torch.zeros((), dtype=torch.int64, device=self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        graphs = {}
        for size in {min(batch, n), n % batch or min(batch, n)}:
            x = torch.zeros(size, self.in_features, device=self.device)
            y = torch.zeros(size, self.out_features, device=self.device)
            offsets = torch.arange(size, device=self.device)

            def body(size=size, x=x, y=y, offsets=offsets):
                idx = order.index_select(0, offsets + pos)
                torch.index_select(X, 0, idx, out=x)
                torch.index_select(Y, 0, idx, out=y)
                loss = self._body(x, y)
                total.add_(loss.double() * size)
                pos.add_(size)
                return loss

            with torch.no_grad():
                graphs[size] = (self._capture_without_training(body)[0], self._captured_grads)
            pos.zero_()
            total.zero_()
        self._run_key, self._run_entry = key, (graphs, order, pos, total)
        return self._run_entry

    def _tensors(self) -> List[Tensor]:
        out = list(self.params) + list(self.steps)
        for s in self.state:
            out += [s["exp_avg"], s["exp_avg_sq"]] + ([s["max_exp_avg_sq"]] if "max_exp_avg_sq" in s else [])
        return out

    def set_hyperparameters(self, **hyper) -> None:
        if hyper == self.hyper:
            return
        if needs_new_capture(self.hyper, hyper):  # betas, eps, weight decay are baked into the launches
            self._drop_graphs()
        self.hyper = dict(hyper)
        self._lr.fill_(float(hyper["lr"]))  # in stream order: the next replay reads it

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._run_key = None

    def _write_back_steps(self) -> None:
        values = torch.stack(self.steps).tolist()  # one read from the device for all of them
        for s, v in zip(self.state, values):
            if isinstance(s["step"], Tensor):
                s["step"].fill_(v)
            else:
                s["step"] = v

    def _check(self, t: Tensor, name: str, cols: int, move: bool = True) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"aiaas_fast.Engine: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() == 1 and cols == 1:
            t = t.unsqueeze(1)
        if t.dim() != 2 or t.shape[1] != cols:
            raise RuntimeError(f"aiaas_fast.Engine: {name} must be (rows, {cols}), got shape {list(t.shape)}")
        if t.dtype != torch.float32:
            raise RuntimeError(f"aiaas_fast.Engine: {name} must be float32, got {t.dtype}")
        return t.to(self.device, non_blocking=True) if move else t

    def step(self, x: Tensor, y: Tensor) -> float:
        x, y = self._check(x, "x", self.in_features), self._check(y, "y", self.out_features)
        if len(x) != len(y) or len(x) == 0:
            raise RuntimeError(f"aiaas_fast.Engine.step: x has {len(x)} rows and y has {len(y)}")
        self._follow_precision()
        replay, xs, ys, loss, grads = self._graph(len(x))
        xs.copy_(x)
        ys.copy_(y)
        replay()
        self._last_grads = grads
        self._write_back_steps()
        return float(loss)

    def run(self, X: Tensor, Y: Tensor, *, epochs: int, batch_size: int, seed: int, shuffle: bool,
            callback: Optional[Callable] = None, callback_every: int = 0, rows: Optional[Tensor] = None) -> Tensor:
        X, Y = self._check(X, "x", self.in_features, False), self._check(Y, "y", self.out_features, False)
        if len(X) != len(Y):
            raise RuntimeError(f"aiaas_fast.Engine.run: x has {len(X)} rows but y has {len(Y)}")
        X, Y = self._staged(X, "x"), self._staged(Y, "y")
        if batch_size < 1:
            raise RuntimeError(f"aiaas_fast.Engine.run: batch_size must be >= 1, got {batch_size}")
        base = torch.as_tensor(rows, dtype=torch.int64) if rows is not None else torch.arange(len(X))
        if len(base) == 0:
            raise RuntimeError("aiaas_fast.Engine.run: x has no rows")
        bad = (base < 0) | (base >= len(X))
        if bad.any():  # inside the graph an index out of range is a device assert: refuse it here
            raise RuntimeError(f"aiaas_fast.Engine.run: sample_index holds row {int(base[bad][0])} for model 0, but x "
                               f"has {len(X)} rows")
        base = base.to(self.device)
        gen = torch.Generator().manual_seed(seed)
        n, losses = len(base), []
        batch_size = min(batch_size, n)  # one batch of all rows: buffers follow the rows, not the number asked for
        steps_in_epoch = (n + batch_size - 1) // batch_size
        self._follow_precision()
        graphs, order, pos, total = self._run_graphs(X, Y, n, batch_size)
        for epoch in range(epochs):
            order[:n].copy_(base[torch.randperm(n, generator=gen).to(self.device)] if shuffle else base)
            pos.zero_()
            total.zero_()
            stop = False
            for s in range(steps_in_epoch):
                replay, self._last_grads = graphs[min(batch_size, n - s * batch_size)]
                replay()
                done = s + 1
                at_end = done == steps_in_epoch
                if callback is not None and (at_end or (callback_every and done % callback_every == 0)):
                    seen = min(done * batch_size, n)
                    if callback(epoch, done, steps_in_epoch, at_end, float(total) / seen):
                        stop = True
                        if not at_end:
                            losses.append(float(total) / seen)
                            break
            else:
                losses.append(float(total) / n)
            if stop:
                break
        self._write_back_steps()
        return torch.tensor(losses, dtype=torch.float64)

    def last_gradients(self) -> List[Tensor]:
        """The last step's gradients, in parameter order (weight, bias per layer): for tests.
        A graph's gradient tensors keep their addresses, and the last replay's values."""
        if self._last_grads is None:
            raise RuntimeError("aiaas_fast.Engine.last_gradients: no step has run yet")
        return [g.detach().clone() for g in self._last_grads]

    def predict(self, X: Tensor) -> Tensor:
        X = self._check(X, "x", self.in_features)
        with torch.no_grad():
            return self.fused.forward(X) if self.fused is not None else self._forward(X)
