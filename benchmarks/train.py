"""Times a whole training step (zero_grad, forward, MSE loss, backward, Adam step) for three
regression MLPs, plain PyTorch against aiaas_fast, in one run.

    python benchmarks/train.py [--device cpu|cuda] [--quick] [--no-compile] [--out DIR]

Networks: the seed network 10->20->1 at batch 64; 64->256->256->1 at batch 512;
512->2048->2048->1 at batch 2048. Providers: eager with Adam(foreach=True) and with
Adam(fused=True); torch.compile of model and loss (Adam fused, eager); aiaas_fast
(aiaas_fast.convert(model), aiaas_fast.nn.MSELoss, aiaas_fast.optim.Adam). All start from
the same weights. Writes benchmarks/results/train-<device>-<time>.{json,md} and, with
matplotlib installed, a plot of steps/s (.png).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aiaas_fast  # noqa: E402
from harness import Results, check_out_dir, device_arg, fmt_time, mm_gflops, positive_int, time_providers  # noqa: E402


def mlp(widths, device):
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).to(device)


def make_step(model, loss_fn, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def compiled_step(model, x, y):
    """A training step with model and loss under torch.compile (fullgraph) and fused Adam;
    run once here, so the compilation is not timed."""
    torch._dynamo.reset()
    loss = nn.MSELoss()
    fwd = torch.compile(lambda x, y: loss(model(x), y), fullgraph=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        fwd(x, y).backward()
        opt.step()

    step()
    return step


def providers_for(widths, batch, device, compile_ok):
    torch.manual_seed(0)
    base = mlp(widths, device)
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randn(batch, widths[-1], device=device)
    fresh = lambda: mlp(widths, device).requires_grad_(True)

    def copy_of_base():
        m = fresh()
        m.load_state_dict(base.state_dict())
        return m

    out = {}
    m = copy_of_base()
    out["eager (Adam foreach)"] = make_step(m, nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True), x, y)
    m = copy_of_base()
    out["eager (Adam fused)"] = make_step(m, nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3, fused=True), x, y)
    why = None
    if compile_ok:
        try:
            out["torch.compile (Adam fused)"] = compiled_step(copy_of_base(), x, y)
        except Exception as e:  # noqa: BLE001 - reported in the table
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    else:
        why = "disabled (--no-compile)"
    m = aiaas_fast.convert(copy_of_base())
    out["aiaas_fast"] = make_step(m, aiaas_fast.nn.MSELoss(), aiaas_fast.optim.Adam(m.parameters(), lr=1e-3), x, y)
    return out, why


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    nets = list(dict.fromkeys(r["x"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(provs)
    for i, prov in enumerate(provs):
        vals = [next((1.0 / r["y50"] for r in rows if r["x"] == n and r["provider"] == prov), 0.0) for n in nets]
        ax.bar([j + i * width for j in range(len(nets))], vals, width, label=prov)
    ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(nets))], nets)
    ax.set_yscale("log")
    ax.set_ylabel("training steps / s (log)")
    ax.set_title("Full training step (forward, MSE, backward, Adam), higher is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--reps", type=positive_int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    res = Results("train", args.device)
    nets = ([("seed 10->20->1", [10, 20, 1], 64)] if args.quick else
            [("seed 10->20->1", [10, 20, 1], 64), ("64->256->256->1", [64, 256, 256, 1], 512),
             ("512->2048->2048->1", [512, 2048, 2048, 1], 2048)])
    lines = []
    for label, widths, batch in nets:
        provs, why = providers_for(widths, batch, args.device, not args.no_compile)
        reps = args.reps or (3 if args.quick else (5 if batch >= 2048 else 9))
        times = time_providers(provs, args.device, reps=reps, block_seconds=0.02 if args.quick else 0.2, wall_clock=True)
        flops = 6.0 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        ceiling = mm_gflops(batch, widths[1], widths[1], device=args.device, reps=3)
        ref = times["eager (Adam foreach)"]["y50"]
        for name, t in times.items():
            res.add(kernel="train_step", provider=name, mode="step", metric="time", unit="s", x=label,
                    config={"widths": widths, "batch": batch}, ratio_vs_eager=ref / t["y50"],
                    steps_per_s=1.0 / t["y50"], gflops=flops / t["y50"] / 1e9, ceiling_gflops=ceiling, **t)
            lines.append([label, str(batch), name, fmt_time(t["y50"]), f"{fmt_time(t['y20'])} - {fmt_time(t['y80'])}",
                          f"{1.0 / t['y50']:.0f}", f"{ref / t['y50']:.2f}x", f"{flops / t['y50'] / 1e9:.1f}", f"{ceiling:.0f}"])
        if why:
            lines.append([label, str(batch), "torch.compile (Adam fused)", "n/a", why, "", "", "", ""])
    res.table("Training step, float32",
              ["network", "batch", "provider", "median", "p20 - p80", "steps/s", "vs eager (foreach)", "GFLOP/s",
               "torch.mm GFLOP/s"], lines)
    base = res.write(args.out)
    png = plot(res.rows, base + ".png")
    print(f"results: {base}.json, {base}.md" + (f", {png}" if png else " (no plot: matplotlib not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
