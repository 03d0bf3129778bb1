"""Times each aiaas_fast op, forward plus backward, against plain PyTorch in one run.

    python benchmarks/ops.py [--device cpu|cuda] [--quick] [--no-compile] [--reps N] [--out DIR] [--wait-quiet SECONDS]

linear_relu vs F.relu(F.linear(...)) (eager and torch.compile), mse_loss vs F.mse_loss
(eager and torch.compile), the adam_ update vs torch.optim.Adam(foreach=True) and
(fused=True); beside each, the machine's ceiling measured in the same run (torch.mm
GFLOP/s at the same shape; copy bandwidth at 64 MB, out of cache, and at the op's own
bytes, from whichever cache holds them). Writes benchmarks/results/ops-<device>-<date>T<time>.{json,md}
Runs unchanged under torchrun: each rank times its own device and writes its own file
(-rank<r> in its name). On CUDA, triton.testing.do_bench times the providers when
Triton is installed.
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
from aiaas_fast.ops import adam_, linear_relu, mse_loss   # noqa: E402
from harness import (Results, check_out_dir, copy_gbps, device_arg, fmt_time, mm_fn, positive_int,  # noqa: E402
                     select_device, time_providers, wait_until_quiet)


def _providers(eager_fn, ours_fn, step, compile_ok):
    """eager, aiaas_fast and (when it compiles and runs here) torch.compile of the eager
    function, each wrapped by ``step``; plus why torch.compile is missing, if it is."""
    providers = {"eager": step(eager_fn), "aiaas_fast": step(ours_fn)}
    if not compile_ok:
        return providers, "disabled (--no-compile)"
    try:  # a failure to compile is reported in the table, not raised
        torch._dynamo.reset()
        compiled = step(torch.compile(eager_fn, fullgraph=True))
        compiled()
    except Exception as e:  # noqa: BLE001
        return providers, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    providers["torch.compile"] = compiled
    return providers, None


def bench_linear_relu(res: Results, device: str, shapes, reps: int, compile_ok: bool) -> None:
    lines = []
    for batch, fin, fout in shapes:
        x = torch.randn(batch, fin, device=device, requires_grad=True)
        w = (torch.randn(fout, fin, device=device) * fin**-0.5).requires_grad_()
        b = torch.randn(fout, device=device, requires_grad=True)
        g = torch.randn(batch, fout, device=device)

        def eager_fn(x, w, b):
            return F.relu(F.linear(x, w, b))

        def step(f):
            def run():
                x.grad = w.grad = b.grad = None  # as zero_grad(set_to_none=True)
                f(x, w, b).backward(g)
            return run

        providers, why = _providers(eager_fn, linear_relu, step, compile_ok)
        # The ceiling, torch.mm at the forward product's shape, is timed in the same
        # interleaved rounds: the machine's speed drifts within a run on a shared host.
        times = time_providers({**providers, "ceiling: torch.mm": mm_fn(batch, fin, fout, device=device)},
                               device, reps=reps)
        ceiling = 2.0 * batch * fin * fout / times.pop("ceiling: torch.mm")["y50"] / 1e9
        flops = 6.0 * batch * fin * fout  # forward product + two backward products
        shape = f"{batch}x{fin}->{fout}"
        for name, t in times.items():
            ratio = times["eager"]["y50"] / t["y50"]
            res.add(kernel="linear_relu", provider=name, mode="fwd+bwd", metric="time", unit="s", x=shape,
                    config={"batch": batch, "in": fin, "out": fout, "dtype": "float32"}, ratio_vs_eager=ratio,
                    gflops=flops / t["y50"] / 1e9, ceiling_gflops=ceiling, **t)
            lines.append([shape, name, fmt_time(t["y50"]), f"{fmt_time(t['y20'])} - {fmt_time(t['y80'])}",
                          f"{ratio:.2f}x", f"{flops / t['y50'] / 1e9:.1f}", f"{ceiling:.1f}"])
        if "torch.compile" not in times:
            lines.append([shape, "torch.compile", "n/a", why or "", "", "", ""])
    res.table("linear_relu forward + backward, float32",
              ["shape", "provider", "median", "p20 - p80", "vs eager", "GFLOP/s", "torch.mm GFLOP/s"], lines)


def bench_mse_loss(res: Results, device: str, sizes, reps: int, compile_ok: bool, bandwidth: float) -> None:
    lines = []
    for n in sizes:
        x = torch.randn(n, device=device, requires_grad=True)
        t = torch.randn(n, device=device)

        def eager_fn(x, t):
            return F.mse_loss(x, t)

        def step(f):
            def run():
                x.grad = None
                f(x, t).backward()
            return run

        providers, why = _providers(eager_fn, mse_loss, step, compile_ok)
        times = time_providers(providers, device, reps=reps)
        # The least traffic a fwd+bwd can make: read input and target, write the gradient.
        min_bytes = 3.0 * n * 4
        # A copy over the same working set (input, target, gradient: here also the bytes
        # moved): its ceiling is that of the cache level these tensors fit in.
        same = copy_gbps(device, mbytes=min_bytes / 2 / (1 << 20), reps=reps)
        for name, tm in times.items():
            ratio = times["eager"]["y50"] / tm["y50"]
            gbps = min_bytes / tm["y50"] / 1e9
            res.add(kernel="mse_loss", provider=name, mode="fwd+bwd", metric="time", unit="s", x=n,
                    config={"numel": n, "dtype": "float32", "reduction": "mean"}, ratio_vs_eager=ratio,
                    gbps=gbps, ceiling_gbps=bandwidth, ceiling_gbps_same_working_set=same, **tm)
            lines.append([f"{n:,}", name, fmt_time(tm["y50"]), f"{fmt_time(tm['y20'])} - {fmt_time(tm['y80'])}",
                          f"{ratio:.2f}x", f"{gbps:.1f}", f"{same:.1f}", f"{bandwidth:.1f}"])
        if "torch.compile" not in times:
            lines.append([f"{n:,}", "torch.compile", "n/a", why or "", "", "", "", ""])
    res.table("mse_loss forward + backward, float32, reduction='mean'",
              ["elements", "provider", "median", "p20 - p80", "vs eager", "GB/s (3 x 4 B/elem)",
               "copy GB/s, same working set", "copy GB/s, 64 MB"], lines)


def bench_adam(res: Results, device: str, groups, reps: int, bandwidth: float) -> None:
    lines = []
    for label, shapes in groups:
        numel = sum(torch.Size(s).numel() for s in shapes)
        grads = [torch.randn(s, device=device) for s in shapes]

        def torch_opt(**kw):
            params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
            for p, g in zip(params, grads):
                p.grad = g
            opt = torch.optim.Adam(params, lr=1e-3, **kw)
            return opt.step

        params = [torch.randn(s, device=device) for s in shapes]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]

        def ours():
            adam_(params, grads, m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999)

        providers = {"foreach": torch_opt(foreach=True), "fused": torch_opt(fused=True), "aiaas_fast": ours}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = time_providers(providers, device, reps=reps)
        min_bytes = 7.0 * numel * 4  # read param, grad, exp_avg, exp_avg_sq; write three of them
        # A copy over the same working set (those four tensors, 16 B/param, src + dst): the
        # ceiling of the cache level that holds them. A copy reads and writes 1:1 where the
        # update reads 4 and writes 3, so the update may beat it somewhat.
        same = copy_gbps(device, mbytes=16.0 * numel / 2 / (1 << 20), reps=reps)
        for name, tm in times.items():
            gbps = min_bytes / tm["y50"] / 1e9
            res.add(kernel="adam", provider=name, mode="step", metric="time", unit="s", x=label,
                    config={"numel": numel, "tensors": len(shapes), "dtype": "float32"},
                    ratio_vs_foreach=times["foreach"]["y50"] / tm["y50"],
                    ratio_vs_fused=times["fused"]["y50"] / tm["y50"], gbps=gbps, ceiling_gbps=bandwidth,
                    ceiling_gbps_same_working_set=same, **tm)
            lines.append([label, name, fmt_time(tm["y50"]), f"{fmt_time(tm['y20'])} - {fmt_time(tm['y80'])}",
                          f"{times['foreach']['y50'] / tm['y50']:.2f}x", f"{times['fused']['y50'] / tm['y50']:.2f}x",
                          f"{gbps:.1f}", f"{same:.1f}", f"{bandwidth:.1f}"])
    res.table("Adam step, float32 (torch.optim.Adam.step() vs one aiaas_fast.ops.adam_ call)",
              ["group", "provider", "median", "p20 - p80", "vs foreach", "vs fused", "GB/s (7 x 4 B/param)",
               "copy GB/s, same working set", "copy GB/s, 64 MB"], lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default="cuda" if os.environ.get("LOCAL_RANK") and torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions: a smoke run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--reps", type=positive_int, default=None)
    p.add_argument("--out", default=None, help="folder for the result files (default benchmarks/results)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="on a shared machine, first wait up to SECONDS for the CPUs to be idle")
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    device = select_device(args.device)
    if device is None:
        return 2
    reps = args.reps or (3 if args.quick else 11)
    if args.wait_quiet > 0:
        busy = wait_until_quiet(timeout_s=args.wait_quiet)
        print(f"machine busy {busy} of its CPUs when starting")
    res = Results("ops", device)
    print(f"aiaas_fast {aiaas_fast.__version__} on {res.env['device_name']} ({device}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU kernels {res.env['aiaas_fast']['cpu_isa']}")
    bandwidth = copy_gbps(device, mbytes=64)  # out of every cache, so the DRAM ceiling even in --quick
    print(f"copy bandwidth (64 MB, out of cache): {bandwidth:.1f} GB/s")
    if args.quick:
        lin, mse, adam = [(32, 8, 8)], [1000], [("tiny", [(8, 4), (8,)])]
    else:
        lin = [(256, 64, 64), (1024, 256, 256), (4096, 1024, 1024)]
        mse = [10_000, 1 << 20, 16 << 20]
        adam = [("seed net (4 tensors, 241)", [(20, 10), (20,), (1, 20), (1,)]),
                ("1M in 6 tensors", [(512, 1024), (512,), (1024, 512), (512,), (1, 1024), (1,)]),
                ("16M in 6 tensors", [(4096, 2048), (4096,), (2048, 4096), (2048,), (1, 2048), (1,)])]
    compile_ok = not args.no_compile
    bench_linear_relu(res, device, lin, reps, compile_ok)
    bench_mse_loss(res, device, mse, reps, compile_ok, bandwidth)
    bench_adam(res, device, adam, reps, bandwidth)
    base = res.write(args.out)
    print(f"results: {base}.json, {base}.md")
    print(f"load average at start {res.env['loadavg_start']}, at end {res.env['loadavg_end']}; other processes "
          f"used {res.env['other_processes_cpu_fraction']} of the CPUs during the run, hypervisor steal "
          f"{res.env['steal_cpu_fraction']}")
    if res.noise_warning():
        print(res.noise_warning().strip("*"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
