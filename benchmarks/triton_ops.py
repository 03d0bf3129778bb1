"""Times the Triton kernels against plain PyTorch eager, torch.compile, the native backend
and the machine's ceilings measured in the same run (torch.mm TFLOP/s at the same shape
and dtype; device-to-device copy bandwidth), with triton.testing.do_bench medians on CUDA.

    python benchmarks/triton_ops.py [--device cuda] [--quick] [--no-compile] [--out DIR]

Cases (the issue's targets on an H200):
  linear_relu forward, 8192x8192x8192 bf16        >= 90% of torch.mm's TFLOP/s
  linear_relu fwd+bwd, 4096x1024->1024 bf16      >= 1.2x eager, not slower than torch.compile
  mse_loss fwd+bwd, 64M float32                  >= 80% of the copy bandwidth
  Adam step, 100M float32 params                 >= 80% of the copy bandwidth, not slower than fused=True
Writes <out>/triton_ops-<device>-<time>[-rank<r>].{json,md} after every case (cheapest first),
so a run cut short keeps what it measured; Ctrl-C (SIGINT, as gpu_check.sh's time limit sends)
writes and exits 130. Runs unchanged under torchrun. The forward+backward case is also timed as
a loop of calls (wall clock), where the CPU's launch and autograd work counts; do_bench's cache
flush before each call hides it. --quick uses tiny sizes (a smoke run; on a CPU the Triton
provider needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aiaas_fast   # noqa: E402
from aiaas_fast import backend as _backend   # noqa: E402
from aiaas_fast.ops import adam_, linear_relu, mse_loss   # noqa: E402
from harness import (Results, check_out_dir, copy_gbps, device_arg, drop_failing, fmt_time, mm_fn,  # noqa: E402
                     select_device, time_providers)


def _with(name, fn):
    def run():
        with aiaas_fast.use_backend(name):
            return fn()
    return run


def _ours(device: str):
    """The aiaas_fast backends that can run here: triton always (it is what we time), native if it has a kernel."""
    names = ["triton"]
    if _backend.native_supports(torch.device(device).type):
        names.append("native")
    return names


def _compiled(fn, enabled, step=lambda f: f):
    """step(torch.compile(fn)) if it compiles and runs here, else None (reported, not raised)."""
    if not enabled:
        return None, "disabled (--no-compile)"
    try:
        torch._dynamo.reset()
        c = step(torch.compile(fn, fullgraph=True))
        c()
        return c, None
    except Exception as e:  # noqa: BLE001
        print(f"torch.compile baseline unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None, f"{type(e).__name__}"


def _timed(res, providers, device, case, wall_clock=False):
    """time_providers over the providers that run (harness.drop_failing); failures recorded in res."""
    failed = res.env.setdefault("failed_providers", [])
    ok = drop_failing(providers, failed, case, "benchmarks/triton_ops.py")
    return time_providers(ok, device, wall_clock=wall_clock, failed=failed, case=case) if ok else {}


def _record(res, lines, kernel, x, times, ref_name, extra):
    """One row per provider; ratios against ref_name where it ran (else none: its failure is recorded)."""
    for name, t in times.items():
        ratio = times[ref_name]["y50"] / t["y50"] if ref_name in times else None
        row = extra(name, t)
        res.add(kernel=kernel, provider=name, x=x, metric="time", unit="s", ratio=ratio,
                ratio_vs=ref_name if ratio is not None else None, **row, **t)
        lines.append([kernel, x, name, fmt_time(t["y50"]), f"{ratio:.2f}x vs {ref_name}" if ratio is not None else "-",
                      ", ".join(f"{k}={v:.1f}" for k, v in row.items() if isinstance(v, float))])


def bench_linear_relu_forward(res, lines, device, m, k, n, dtype, compile_ok):
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    b = torch.randn(n, device=device, dtype=dtype)
    providers = {"eager": lambda: F.relu(F.linear(x, w, b))}
    with torch.no_grad():  # compiled as it is timed: grad mode is a guard, another would recompile
        c, _ = _compiled(lambda: F.relu(F.linear(x, w, b)), compile_ok)
    if c is not None:
        providers["torch.compile"] = c
    for name in _ours(device):
        providers[name] = _with(name, lambda: linear_relu(x, w, b))
    providers["ceiling: torch.mm"] = mm_fn(m, k, n, dtype=dtype, device=device)
    shape = f"fwd {m}x{k}->{n} {str(dtype).replace('torch.', '')}"
    with torch.no_grad():
        times = _timed(res, providers, device, shape)
    flops = 2.0 * m * k * n
    _record(res, lines, "linear_relu", shape, times, "ceiling: torch.mm", lambda name, t: {"tflops": flops / t["y50"] / 1e12})


def bench_linear_relu_fwd_bwd(res, lines, device, m, k, n, dtype, compile_ok):
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype) * k**-0.5).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=dtype)

    def step(f):
        def run():
            x.grad = w.grad = b.grad = None
            f().backward(g)
        return run

    eager = lambda: F.relu(F.linear(x, w, b))
    providers = {"eager": step(eager)}
    c, _ = _compiled(eager, compile_ok, step)
    if c is not None:
        providers["torch.compile"] = c
    for name in _ours(device):
        providers[name] = _with(name, step(lambda: linear_relu(x, w, b)))
    shape = f"fwd+bwd {m}x{k}->{n} {str(dtype).replace('torch.', '')}"
    times = _timed(res, providers, device, shape)
    flops = 6.0 * m * k * n
    _record(res, lines, "linear_relu", shape, times, "eager", lambda name, t: {"tflops": flops / t["y50"] / 1e12})
    if device.startswith("cuda"):  # as a training loop sees it: launches and autograd included
        times = _timed(res, providers, device, shape + " (wall clock)", wall_clock=True)
        _record(res, lines, "linear_relu", shape + " (wall clock)", times, "eager",
                lambda name, t: {"tflops": flops / t["y50"] / 1e12})


def bench_mse_loss(res, lines, device, numel, compile_ok, bandwidth):
    x = torch.randn(numel, device=device, requires_grad=True)
    t = torch.randn(numel, device=device)

    def step(f):
        def run():
            x.grad = None
            f().backward()
        return run

    eager = lambda: F.mse_loss(x, t)
    providers = {"eager": step(eager)}
    c, _ = _compiled(eager, compile_ok, step)
    if c is not None:
        providers["torch.compile"] = c
    for name in _ours(device):
        providers[name] = _with(name, step(lambda: mse_loss(x, t)))
    times = _timed(res, providers, device, f"mse_loss fwd+bwd {numel:,}")
    min_bytes = 12.0 * numel  # read input and target, write the gradient
    _record(res, lines, "mse_loss", f"fwd+bwd {numel:,} float32", times, "eager",
            lambda name, tm: {"gbps": min_bytes / tm["y50"] / 1e9, "fraction_of_copy": min_bytes / tm["y50"] / 1e9 / bandwidth})


def bench_adam(res, lines, device, shapes, bandwidth):
    grads = [torch.randn(s, device=device) for s in shapes]

    def torch_opt(**kw):
        ps = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        return torch.optim.Adam(ps, lr=1e-3, **kw).step

    providers = {"fused": torch_opt(fused=True), "foreach": torch_opt(foreach=True)}
    for name in _ours(device):
        ps = [torch.randn(s, device=device) for s in shapes]
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        steps = [torch.tensor(0.0) for _ in ps]
        providers[name] = _with(name, lambda ps=ps, m=m, v=v, steps=steps: adam_(ps, grads, m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = _timed(res, providers, device, f"adam {len(shapes)} tensors")
    numel = sum(torch.Size(s).numel() for s in shapes)
    min_bytes = 28.0 * numel  # read param, grad, exp_avg, exp_avg_sq; write three of them
    _record(res, lines, "adam", f"{numel:,} float32 params in {len(shapes)} tensors", times, "fused",
            lambda name, tm: {"gbps": min_bytes / tm["y50"] / 1e9, "fraction_of_copy": min_bytes / tm["y50"] / 1e9 / bandwidth})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    device = select_device(args.device)
    if device is None:
        return 2
    res = Results("triton_ops", device)
    bandwidth = copy_gbps(device, mbytes=8 if args.quick else 1024)
    print(f"aiaas_fast {aiaas_fast.__version__} on {res.env['device_name']} ({device}), torch {torch.__version__}; "
          f"copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    res.env["copy_gbps"] = bandwidth
    lines = []
    compile_ok = not args.no_compile
    # Cheapest first (the forward at 8192^3 autotunes the most), written after each.
    if args.quick:
        cases = [lambda: bench_mse_loss(res, lines, device, 10_000, compile_ok, bandwidth),
                 lambda: bench_adam(res, lines, device, [(64, 32), (32,)], bandwidth),
                 lambda: bench_linear_relu_fwd_bwd(res, lines, device, 64, 32, 48, torch.float32, compile_ok),
                 lambda: bench_linear_relu_forward(res, lines, device, 64, 32, 48, torch.float32, compile_ok)]
    else:
        cases = [lambda: bench_mse_loss(res, lines, device, 64 << 20, compile_ok, bandwidth),
                 lambda: bench_adam(res, lines, device, [(8192, 8192), (8192,), (4096, 8192), (8192,), (8192, 1024), (1,)],
                                    bandwidth),
                 lambda: bench_linear_relu_fwd_bwd(res, lines, device, 4096, 1024, 1024, torch.bfloat16, compile_ok),
                 lambda: bench_linear_relu_forward(res, lines, device, 8192, 8192, 8192, torch.bfloat16, compile_ok)]
    status = 0
    try:
        for i, case in enumerate(cases):
            case()
            if i < len(cases) - 1:
                res.write(args.out)
    except KeyboardInterrupt:
        res.env["interrupted"] = f"after {len(res.rows)} rows: the later cases were not measured"
        print(f"benchmarks/triton_ops.py: interrupted; {res.env['interrupted']}", file=sys.stderr, flush=True)
        status = 130
    res.table("Triton kernels vs PyTorch, native and the ceilings", ["kernel", "case", "provider", "median", "ratio", "rate"], lines)
    base = res.write(args.out)
    print(f"results: {base}.json, {base}.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
