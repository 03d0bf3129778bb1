"""A short demo: the project's first network trained with the fused ops, beside plain PyTorch.

    python -m aiaas_fast.demo [--steps 300] [--batch 64]

Trains ``Linear(10, 20) -> ReLU -> Linear(20, 1)`` with MSE and Adam(lr=0.001) from the
same initial weights and data twice: once with plain PyTorch (F.linear, F.relu,
F.mse_loss, torch.optim.Adam) and once with aiaas_fast's fused ops (linear_relu,
mse_loss, one adam_ call per step); prints both final losses, their largest difference
and the time per step of each.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import aiaas_fast
from aiaas_fast.ops import adam_, linear_relu, mse_loss


def _initial_weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    l1, l2 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 1)
    with torch.no_grad():
        for layer in (l1, l2):
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    return [t.detach().clone() for t in (l1.weight, l1.bias, l2.weight, l2.bias)]


def _data(steps: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps, batch, 10, generator=g)
    true_w = torch.randn(10, 1, generator=g)
    y = torch.tanh(x @ true_w) + 0.05 * torch.randn(steps, batch, 1, generator=g)
    return x, y


def train_pytorch(params, x, y, lr):
    params = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    start = time.perf_counter()
    for xb, yb in zip(x, y):
        w1, b1, w2, b2 = params
        loss = F.mse_loss(F.linear(F.relu(F.linear(xb, w1, b1)), w2, b2), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), time.perf_counter() - start


def train_fused(params, x, y, lr):
    params = [p.clone().requires_grad_() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    losses = []
    start = time.perf_counter()
    for xb, yb in zip(x, y):
        w1, b1, w2, b2 = params
        loss = mse_loss(F.linear(linear_relu(xb, w1, b1), w2, b2), yb)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=0.9, beta2=0.999)
        losses.append(loss.detach())
    return torch.stack(losses), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or not args.lr > 0:
        parser.error("--steps and --batch must be >= 1 and --lr > 0")

    info = aiaas_fast.build_info()
    print(f"aiaas_fast {info['version']} (torch {info['torch_version']}, CPU kernels: {info['cpu_isa']}, "
          f"{torch.get_num_threads()} threads)")
    params = _initial_weights(args.seed)
    x, y = _data(args.steps, args.batch, args.seed)
    # One untimed short pass each, so first-call costs are not counted.
    train_pytorch(params, x[:5], y[:5], args.lr)
    train_fused(params, x[:5], y[:5], args.lr)
    ref_losses, ref_time = train_pytorch(params, x, y, args.lr)
    losses, fused_time = train_fused(params, x, y, args.lr)
    diff = (losses - ref_losses).abs().max().item()
    print(f"seed network 10->20->1, batch {args.batch}, {args.steps} Adam steps")
    print(f"  plain PyTorch : final loss {ref_losses[-1].item():.6f}   {ref_time / args.steps * 1e6:8.1f} us/step")
    print(f"  aiaas_fast    : final loss {losses[-1].item():.6f}   {fused_time / args.steps * 1e6:8.1f} us/step")
    print(f"  largest loss difference over all steps: {diff:.2e};  speedup {ref_time / fused_time:.2f}x")
    if not diff <= 1e-4:
        print("error: the fused ops diverged from plain PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
