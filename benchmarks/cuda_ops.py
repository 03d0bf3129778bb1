"""The native CUDA kernels against the GPU's own baselines, in one run.

    python benchmarks/cuda_ops.py [--quick] [--no-compile] [--out DIR]

linear_relu forward at 8192^3 bf16: torch.mm, eager F.relu(F.linear), torch._addmm_activation
(cuBLASLt's fused RELU_BIAS path inside PyTorch), torch.compile, the Triton backend (when
aiaas_fast.set_backend exists) and ours with each GEMM (AIAAS_FAST_CUDA_GEMM=cutlass /
cublaslt / auto), as TFLOP/s and as a fraction of torch.mm (target >= 95%).
linear_relu forward+backward at batch 4096, 1024->1024 bf16: eager, torch.compile, Triton,
ours (target >= 1.3x eager and ahead of torch.compile).
mse_loss (forward writing the gradient) and Adam (16M float32 params in 6 tensors) as GB/s
against the copy bandwidth measured in the same run (target >= 85%); so is the pass of
linear_relu's backward before its products (the ReLU mask and the bias gradient's sums).
Writes benchmarks/results/cuda-ops-<date>T<time>.{json,md} after each section (cheapest first);
Ctrl-C (SIGINT) writes what was measured and exits 130. Without CUDA it says so and exits 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aiaas_fast  # noqa: E402
from aiaas_fast.ops import adam_, linear_relu  # noqa: E402
from harness import check_out_dir, copy_gbps, drop_failing, select_device, time_providers  # noqa: E402


def with_gemm(name, fn):
    """fn on the native backend with AIAAS_FAST_CUDA_GEMM=name (read at every call)."""
    def run():
        os.environ["AIAAS_FAST_CUDA_GEMM"] = name
        with aiaas_fast.use_backend("native"):
            return fn()
    return run


def with_backend(name, fn):
    def run():
        with aiaas_fast.use_backend(name):
            return fn()
    return run


def try_compile(fn, notes, label, step=lambda f: f):
    try:
        torch._dynamo.reset()
        c = step(torch.compile(fn, fullgraph=True))
        c()
        return c
    except Exception as e:  # noqa: BLE001  (reported, not raised)
        notes.append(f"{label}: torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return None


def gemms_run(fn):
    """The products one call of fn ran (aiaas_fast._C.cuda_gemm_counts), e.g. ["cutlass_sm90"]:
    a GEMM choice falls back where its kernel declines the shapes, so say what was timed."""
    counts = getattr(aiaas_fast._C, "cuda_gemm_counts", None)
    if counts is None:
        return []
    before = counts()
    fn()
    torch.cuda.synchronize()
    return sorted(k for k, v in counts().items() if v != before.get(k, 0))


def has_native_cuda() -> bool:
    return aiaas_fast.backend.native_supports("cuda")


def ours_providers(fn):
    """Ours with each GEMM choice (where this build has native CUDA kernels) and on Triton."""
    out = {f"aiaas_fast native ({g})": with_gemm(g, fn) for g in ("auto", "cutlass", "cublaslt")} if has_native_cuda() else {}
    out["aiaas_fast triton"] = with_backend("triton", fn)
    return out


class Run:
    """The rows, notes and failures of one run, written (JSON and Markdown) after every section."""

    def __init__(self, args):
        self.args, self.rows, self.notes, self.failed = args, [], [], []
        self.stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
        self.meta = dict(date=self.stamp, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                         cuda=torch.version.cuda, build=aiaas_fast.build_info(), quick=args.quick, notes=self.notes,
                         failed_providers=self.failed)

    def timed(self, fns, case, wall_clock=False):  # the providers that run; the others recorded in `failed`
        ok = drop_failing(fns, self.failed, case, "benchmarks/cuda_ops.py")
        return time_providers(ok, "cuda", wall_clock=wall_clock, failed=self.failed, case=case) if ok else {}

    def record(self, bench, shape, provider, t, metric, value, ref=None, ref_name=None):
        self.rows.append(dict(bench=bench, shape=shape, provider=provider, seconds=t, metric=metric, value=value,
                              ratio=ref, ratio_vs=ref_name))

    def write(self, quiet=True):
        os.makedirs(self.args.out, exist_ok=True)
        rank = f"-rank{os.environ['RANK']}" if "RANK" in os.environ else ""  # under torchrun: a file per rank
        base = os.path.join(self.args.out, f"cuda-ops-{self.stamp}{'-quick' if self.args.quick else ''}{rank}")
        with open(base + ".json", "w") as f:
            json.dump(dict(meta=self.meta, rows=self.rows), f, indent=1, default=str)
        m = self.meta
        lines = [f"# CUDA ops, {m['gpu']}, {self.stamp} (torch {m['torch']}, CUDA {m['cuda']})", "",
                 "| bench | shape | provider | median | metric | value | ratio |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            t = "" if r["seconds"] is None else f"{r['seconds'] * 1e3:.3f} ms"
            ratio = "" if r["ratio"] is None or r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}x vs {r['ratio_vs']}"
            lines.append(f"| {r['bench']} | {r['shape']} | {r['provider']} | {t} | {r['metric']} | {r['value']:.2f} | {ratio} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        lines += [f"- failed, left out: {f['case']}, {f['provider']}: {f['error']}" for f in self.failed]
        with open(base + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        if not quiet:
            print("\n".join(lines))
            print(f"wrote {base}.json and .md")


def bench_memory_bound(run, q):
    """mse_loss and Adam as GB/s against the copy bandwidth measured here."""
    dev = "cuda"
    copy = copy_gbps(dev, mbytes=64 if q else 1024)
    run.record("copy", "1 GiB" if not q else "64 MiB", "dst.copy_(src)", None, "GB/s", copy)
    numel = (1 << 20) if q else (1 << 24)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(numel, device=dev, dtype=dtype)
        t = torch.randn(numel, device=dev, dtype=dtype)
        byts = 3 * numel * x.element_size()  # read x, t; write the gradient
        fns = {}
        if has_native_cuda():
            fns["aiaas_fast native"] = lambda: torch.ops.aiaas_fast.mse_loss.default(x, t, "mean", True)

        def triton_mse():
            import aiaas_fast.triton  # noqa: F401  (registers torch.ops.aiaas_fast.triton_*)
            return torch.ops.aiaas_fast.triton_mse_loss.default(x, t, "mean", True)
        fns["aiaas_fast triton"] = triton_mse
        xr = x.clone().requires_grad_()

        def eager():
            xr.grad = None  # else every call also adds into the last gradient
            F.mse_loss(xr, t).backward()
        fns["eager fwd+bwd"] = eager
        for name, tm in run.timed(fns, f"mse_loss {numel} {str(dtype)[6:]}").items():
            gbs = byts / tm["y50"] / 1e9
            run.record("mse_loss (loss + grad)", f"{numel} {str(dtype)[6:]}", name, tm["y50"], "GB/s", gbs, gbs / copy,
                       "copy bandwidth")

    # linear_relu's backward pass before its products: the ReLU mask on the gradient and the
    # bias gradient's column sums (here the bias gradient alone: the pass reads g and out).
    for rows, cols, dtype in ((256, 64, torch.float32) if q else (4096, 1024, torch.bfloat16),
                              (1024, 16, torch.float32) if q else (65536, 256, torch.float32)):
        g = torch.randn(rows, cols, device=dev, dtype=dtype)
        out = torch.randn(rows, cols, device=dev, dtype=dtype).relu_()
        x, w = torch.empty(rows, 8, device=dev, dtype=dtype), torch.empty(cols, 8, device=dev, dtype=dtype)
        byts = 2 * g.numel() * g.element_size()
        fns = {"eager threshold_backward + sum": lambda: torch.ops.aten.threshold_backward(g, out, 0).sum(0)}
        if has_native_cuda():
            fns["aiaas_fast native"] = lambda: torch.ops.aiaas_fast.linear_relu_backward(g, x, w, out, [False, False, True])
        shape = f"{rows}x{cols} {str(dtype)[6:]}"
        for name, tm in run.timed(fns, f"relu mask + bias grad {shape}").items():
            gbs = byts / tm["y50"] / 1e9
            run.record("relu mask + bias grad", shape, name, tm["y50"], "GB/s", gbs, gbs / copy, "copy bandwidth")

    sizes = [numel // 6] * 5 + [numel - 5 * (numel // 6)]
    params = [torch.randn(s, device=dev) for s in sizes]
    grads = [torch.randn_like(p) for p in params]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=dev) for _ in params]
    ref_params = [p.clone().requires_grad_() for p in params]
    for rp, gg in zip(ref_params, grads):
        rp.grad = gg
    fused = torch.optim.Adam(ref_params, lr=1e-3, fused=True)
    byts = 7 * 4 * numel  # read p, g, m, v; write p, m, v
    fns = {"torch.optim.Adam(fused=True)": fused.step}
    if has_native_cuda():
        fns["aiaas_fast native"] = lambda: adam_(params, grads, ms, vs, [], steps, lr=1e-3, beta1=0.9, beta2=0.999)
    for name, tm in run.timed(fns, f"adam {numel}").items():
        gbs = byts / tm["y50"] / 1e9
        run.record("adam", f"{numel} fp32 in 6 tensors", name, tm["y50"], "GB/s", gbs, gbs / copy, "copy bandwidth")


def bench_fwd_bwd(run, q, compile_ok):
    """linear_relu forward+backward at batch 4096, 1024->1024 bf16: do_bench (GPU time) and a
    loop of calls (wall clock: the CPU's launch and autograd work included)."""
    dev = "cuda"
    batch, fin, fout = (512, 256, 256) if q else (4096, 1024, 1024)
    x = torch.randn(batch, fin, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(fout, fin, device=dev, dtype=torch.bfloat16) * fin**-0.5).requires_grad_()
    b = torch.randn(fout, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(batch, fout, device=dev, dtype=torch.bfloat16)

    def step(f):
        def go():
            x.grad = w.grad = b.grad = None
            f(x, w, b).backward(g)
        return go

    fns = {"eager": step(lambda x, w, b: F.relu(F.linear(x, w, b))), **ours_providers(step(linear_relu))}
    if compile_ok:
        torch._dynamo.reset()
        comp = torch.compile(lambda x, w, b: F.relu(F.linear(x, w, b)), fullgraph=True)
        try:
            step(comp)()
            fns["torch.compile"] = step(comp)
        except Exception as e:  # noqa: BLE001
            run.notes.append(f"fwd+bwd: torch.compile failed: {type(e).__name__}")
    for timer, wall in (("", False), (" (wall clock)", True)):
        times = run.timed(fns, f"linear_relu fwd+bwd {batch}x{fin}->{fout}{timer}", wall_clock=wall)
        eager_t = times["eager"]["y50"] if "eager" in times else float("nan")
        for name, t in times.items():
            run.record("linear_relu fwd+bwd" + timer, f"{batch}x{fin}->{fout} bf16", name, t["y50"], "x eager",
                       eager_t / t["y50"], eager_t / t["y50"], "eager")


def bench_forward(run, q, compile_ok, compile_only=False):
    """linear_relu forward at 8192^3 bf16 against torch.mm, cuBLASLt's fused path, torch.compile.
    ``compile_only``: torch.compile beside torch.mm alone, as a last section (its cold compile
    costs seconds that the headline number must not wait for)."""
    dev = "cuda"
    n = 1024 if q else 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, n, device=dev, dtype=torch.bfloat16) * n**-0.5
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    outbuf = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    wt = w.t()
    fns = {"torch.mm": lambda: torch.mm(x, wt, out=outbuf)}
    if not compile_only:
        fns.update({
            "eager": lambda: F.relu(F.linear(x, w, b)),
            "torch._addmm_activation": lambda: torch._addmm_activation(b, x, wt),
            **ours_providers(lambda: linear_relu(x, w, b)),
        })
    if compile_ok:
        c = try_compile(lambda: F.relu(F.linear(x, w, b)), run.notes, "linear_relu forward")
        if c is not None:
            fns["torch.compile"] = c
    times = run.timed(fns, f"linear_relu forward {n}^3" + (" (torch.compile)" if compile_only else ""))
    for name in times:
        if name.startswith("aiaas_fast native"):
            run.notes.append(f"linear_relu forward, {name} ran: {', '.join(gemms_run(fns[name])) or 'unknown'}")
    flops = 2.0 * n * n * n
    mm_t = times["torch.mm"]["y50"] if "torch.mm" in times else float("nan")
    for name, t in times.items():
        if compile_only and name == "torch.mm":
            continue  # the first section recorded it; here it is only the ratio's base, timed alongside
        run.record("linear_relu forward", f"{n}x{n}->{n} bf16", name, t["y50"], "TFLOP/s", flops / t["y50"] / 1e12,
                   mm_t / t["y50"], "torch.mm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not numbers to record")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    if not torch.cuda.is_available():
        print("benchmarks/cuda_ops.py: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 1
    select_device("cuda")  # under torchrun: this rank's GPU, made current ("cuda" below means it)
    torch.backends.cuda.matmul.allow_tf32 = False
    run = Run(args)
    if not has_native_cuda():
        run.notes.append("this build has no native CUDA kernels: only the Triton backend and PyTorch were timed")
    status = 0
    # Written after each section: a run cut short keeps what it measured. The forward's target
    # number first, the cold torch.compile baselines (tens of seconds) last.
    compile_ok = not args.no_compile
    sections = [lambda: bench_forward(run, args.quick, False), lambda: bench_memory_bound(run, args.quick),
                lambda: bench_fwd_bwd(run, args.quick, compile_ok)]
    if compile_ok:
        sections.append(lambda: bench_forward(run, args.quick, True, compile_only=True))
    try:
        for section in sections:
            section()
            run.write()
    except KeyboardInterrupt:
        run.notes.append(f"interrupted after {len(run.rows)} rows: the later sections were not measured")
        print("benchmarks/cuda_ops.py: interrupted; writing what was measured", file=sys.stderr, flush=True)
        status = 130
    run.write(quiet=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
