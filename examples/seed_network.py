"""The project's first network, trained with aiaas_fast: Linear(10, 20) -> ReLU ->
Linear(20, 1), MSELoss, Adam(lr=0.001), 100 steps, beside the same code in plain PyTorch
from the same initial weights and data.

    python examples/seed_network.py
"""
import torch

import aiaas_fast


def seed_network_pytorch():
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))


def train(model, criterion, optimizer, x, y):
    losses = []
    for xb, yb in zip(x, y):
        optimizer.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(steps: int = 100, batch: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    reference = seed_network_pytorch()
    x = torch.randn(steps, batch, 10)
    y = x[..., :3].sum(-1, keepdim=True).sin() + 0.1 * torch.randn(steps, batch, 1)

    # aiaas_fast, written with its own modules, starting from the same weights.
    ours = torch.nn.Sequential(aiaas_fast.nn.LinearReLU(10, 20), torch.nn.Identity(), aiaas_fast.nn.Linear(20, 1))
    ours.load_state_dict(reference.state_dict())

    ref_losses = train(reference, torch.nn.MSELoss(), torch.optim.Adam(reference.parameters(), lr=0.001), x, y)
    our_losses = train(ours, aiaas_fast.nn.MSELoss(), aiaas_fast.optim.Adam(ours.parameters(), lr=0.001), x, y)
    return our_losses, ref_losses


if __name__ == "__main__":
    ours, ref = run()
    worst = max(abs(a - b) for a, b in zip(ours, ref))
    print(f"step   1: aiaas_fast {ours[0]:.6f}  pytorch {ref[0]:.6f}")
    print(f"step 100: aiaas_fast {ours[-1]:.6f}  pytorch {ref[-1]:.6f}")
    print(f"largest difference over 100 steps: {worst:.2e}")
