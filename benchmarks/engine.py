"""Training steps per second of the compiled engine against PyTorch, in one run.

    python benchmarks/engine.py [--quick] [--no-compile] [--sweep] [--batch-scaling] [--predict] [--models K] [--out DIR]

Single models (seed 10->20->1 at batch 64; 64->256->256->1 at batch 512; a 64-wide,
4-hidden-layer MLP at batch 16384, which the engine trains in chunks): eager PyTorch with
Adam(fused=True) (the reference) and Adam(foreach=True), torch.compile of model and loss with
fused Adam, the op-by-op aiaas_fast path (convert, MSELoss, optim.Adam), the engine's step()
(one Python call per step) and the engine's run() (the whole epoch in C++, time per step).

Many models (K seed networks at batch 64, default K = 256): a Python loop over K eager models
(Adam fused each), torch.func.vmap of grad over the stacked models with one fused Adam, the
stacked models with torch.bmm and autograd (aiaas_fast.Ensemble.forward), and the engine
(step() with a shared batch; run() with each model on its own rows).

Every table has the achieved GFLOP/s (6 x batch x weights per step) beside torch.mm's at the
layer's shape and at 1024^3 (the machine's product ceiling), timed in the same run.
``--sweep`` times the engine's two kernel paths (hand kernels, BLAS) over widths and batches:
the measurement behind the engine's switch point (CPU only). ``--batch-scaling`` times a
64-wide MLP's step from batch 64 to 65536 against eager, both paths (CPU only): the
measurement behind training large batches in chunks of 1024 rows. ``--predict`` times the
engine's predict() against the model's own forward under torch.no_grad() (CPU only), for the
seed network, the 64-wide MLP and 64->256->256->1 from 64 to 65536 rows. ``--device cuda`` times the
single-model table on the GPU for the seed network and a 64-wide, 4-hidden-layer MLP at batch
65536 (the engine there is a captured CUDA graph of the fused MLP kernel, and, for
comparison, a graph of the fused ops, ``path="graph"``), the many-model table with the
models on the GPU (the engine there: batched products, a CUDA graph per step of all K), and
last the 64-wide MLP again with TF32 allowed for eager and engine alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aiaas_fast  # noqa: E402
from aiaas_fast.engine import Engine  # noqa: E402
from aiaas_fast.ensemble import ensemble_engine  # noqa: E402
from harness import (Results, check_out_dir, device_arg, drop_failing, fmt_time, mm_fn, positive_int,  # noqa: E402
                     record_failure, select_device, time_providers)
from train import compiled_step, make_step, mlp  # noqa: E402


def single_providers(widths, batch, compile_ok, steps_per_run, device="cpu"):
    """name -> (fn, steps per call)."""
    torch.manual_seed(0)
    base = mlp(widths, device)
    x, y = torch.randn(batch, widths[0], device=device), torch.randn(batch, widths[-1], device=device)
    fresh = lambda: copy.deepcopy(base)
    out = {}
    m = fresh()
    out["eager (Adam fused)"] = (make_step(m, nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3, fused=True), x, y), 1)
    m = fresh()
    out["eager (Adam foreach)"] = (make_step(m, nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True), x, y), 1)
    if compile_ok:
        out["torch.compile (Adam fused)"] = (compiled_step(fresh(), x, y), 1)
    m = aiaas_fast.convert(fresh())
    out["aiaas_fast op by op"] = (make_step(m, aiaas_fast.nn.MSELoss(), aiaas_fast.optim.Adam(m.parameters(), lr=1e-3),
                                            x, y), 1)
    eng = Engine(fresh(), lr=1e-3)
    out["engine step()"] = (lambda: eng.step(x, y), 1)
    eng_run = Engine(fresh(), lr=1e-3)
    X, Y = x.repeat(steps_per_run, 1), y.repeat(steps_per_run, 1)
    out["engine run()"] = (lambda: eng_run.run(X, Y, epochs=1, batch_size=batch, shuffle=False), steps_per_run)
    if device.startswith("cuda") and eng.layer_paths(batch)[0] == "cuda-fused-mlp":
        # The other CUDA path, for comparison: the fused ops and autograd in the same graph.
        eng_graph = Engine(fresh(), lr=1e-3, path="graph")
        out["engine step(), graph of ops"] = (lambda: eng_graph.step(x, y), 1)
    return out, eng.layer_paths(batch)


def working(provs, failed, label):
    """The providers whose first call succeeds (harness.drop_failing); the others are in ``failed``."""
    ok = drop_failing({name: fn for name, (fn, _) in provs.items()}, failed, label, "benchmarks/engine.py")
    return {name: provs[name] for name in ok}


def many_providers(K, widths, batch, steps_per_run, device="cpu"):
    torch.manual_seed(0)
    models = [mlp(widths, device) for _ in range(K)]
    x, y = torch.randn(batch, widths[0], device=device), torch.randn(batch, widths[-1], device=device)
    out = {}

    loop_models = copy.deepcopy(models)
    loop_opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in loop_models]
    loss_fn = nn.MSELoss()

    def python_loop():
        for m, opt in zip(loop_models, loop_opts):
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            opt.step()
    out["Python loop of K eager models"] = (python_loop, 1)

    params, _ = torch.func.stack_module_state(copy.deepcopy(models))
    leaves = [p.detach().requires_grad_(False) for p in params.values()]
    names = list(params)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def one_loss(p, xb, yb):
        return nn.functional.mse_loss(torch.func.functional_call(skeleton, dict(zip(names, p)), (xb,)), yb)

    grads_of = torch.func.vmap(torch.func.grad(one_loss), in_dims=(0, None, None))
    vopt = torch.optim.Adam(leaves, lr=1e-3, fused=True)

    def vmap_step():
        for p, g in zip(leaves, grads_of(leaves, x, y)):
            p.grad = g
        vopt.step()
    out["torch.func.vmap (stacked, Adam fused)"] = (vmap_step, 1)

    ens = aiaas_fast.Ensemble.from_models(copy.deepcopy(models))
    eopt = torch.optim.Adam(ens.parameters(), lr=1e-3, fused=True)

    def bmm_step():
        eopt.zero_grad(set_to_none=True)
        (ens(x) - y).pow(2).mean(dim=(1, 2)).sum().backward()  # sum of per-model mean losses
        eopt.step()
    out["stacked bmm + autograd (Adam fused)"] = (bmm_step, 1)

    ens_e = aiaas_fast.Ensemble.from_models(copy.deepcopy(models))
    core, _ = ensemble_engine(ens_e)
    out["engine step() (K models)"] = (lambda: core.step(x, y), 1)
    ens_r = aiaas_fast.Ensemble.from_models(copy.deepcopy(models))
    core_r, _ = ensemble_engine(ens_r)
    X = torch.randn(batch * steps_per_run, widths[0], device=device)
    Y = torch.randn(batch * steps_per_run, widths[-1], device=device)
    out["engine run() (K models, own rows)"] = (
        lambda: core_r.run(X, Y, epochs=1, batch_size=batch, shuffle=True), steps_per_run)
    if device == "cpu":
        # One model per plant unit, units sorted by name: the first quarter has all the rows,
        # the others a fraction, so a fixed share of models per thread would leave threads idle.
        # Timed per step of all K at the same number of model-steps as the other rows.
        ens_u = aiaas_fast.Ensemble.from_models(copy.deepcopy(models))
        core_u, _ = ensemble_engine(ens_u)
        n_rows = [batch * steps_per_run if k < K // 4 else batch * max(1, steps_per_run // 8) for k in range(K)]
        index = torch.cat([torch.arange(n) for n in n_rows])
        offsets = torch.tensor([0] + n_rows).cumsum(0)
        model_steps = sum(n // batch for n in n_rows) / K
        out["engine run() (K models, uneven rows)"] = (
            lambda: core_u.run(X, Y, epochs=1, batch_size=batch, shuffle=True, sample_index=index,
                               sample_offsets=offsets), model_steps)
    return out


COMPILED = "torch.compile (Adam fused)"


def timed(provs, reps, block, reference="eager (Adam fused)", device="cpu", failed=None, case=""):
    """Per-step times. torch.compile is timed in its own interleaved round with the reference
    (its time scaled by the reference's ratio between the rounds): interleaved with the others,
    Inductor's OpenMP code slowed every provider by about 20% on the 2-core machine."""
    fns = {name: fn for name, (fn, _) in provs.items() if name != COMPILED}
    fns["torch.mm ceiling 1024^3"] = mm_fn(1024, 1024, 1024, device=device)
    times = time_providers(fns, device, reps=reps, block_seconds=block, wall_clock=True, failed=failed, case=case)
    if COMPILED in provs and reference in times:
        own = time_providers({reference: provs[reference][0], COMPILED: provs[COMPILED][0]}, device, reps=reps,
                             block_seconds=block, wall_clock=True, failed=failed, case=case)
        if reference in own and COMPILED in own:
            scale = times[reference]["y50"] / own[reference]["y50"]
            times[COMPILED] = {k: v * scale for k, v in own[COMPILED].items()}
    # A provider that failed while timed is left out (recorded in `failed`).
    per_step = {name: {k: v / provs[name][1] for k, v in times[name].items()} for name in provs if name in times}
    mm = times.get("torch.mm ceiling 1024^3")
    return per_step, (2.0 * 1024**3 / mm["y50"] / 1e9 if mm else float("nan"))


def report(res, title, label, batch, per_step, ref_names, flops, mm_shape, mm_peak, lines, extra=None, device="cpu"):
    # Timed as the steps are (blocks of calls, wall clock), not as a kernel alone.
    mm_same = time_providers({"mm": mm_fn(*mm_shape, device=device)}, device, reps=5, wall_clock=True)["mm"]["y50"]
    mm_same = 2.0 * mm_shape[0] * mm_shape[1] * mm_shape[2] / mm_same / 1e9
    refs = {r: per_step[r]["y50"] if r in per_step else float("nan") for r in ref_names}  # nan: failed while timed
    for name, t in per_step.items():
        ratios = {f"vs {r}": refs[r] / t["y50"] for r in ref_names}
        res.add(kernel="engine", provider=name, mode="train_step", metric="time", unit="s", x=label,
                config={"batch": batch, **(extra or {})}, steps_per_s=1.0 / t["y50"], gflops=flops / t["y50"] / 1e9,
                mm_gflops_same_shape=mm_same, mm_gflops_1024=mm_peak, **{k.replace(" ", "_"): v for k, v in ratios.items()}, **t)
        lines.append([label, name, fmt_time(t["y50"]), f"{fmt_time(t['y20'])} - {fmt_time(t['y80'])}",
                      f"{1.0 / t['y50']:,.0f}", *[f"{v:.2f}x" for v in ratios.values()],
                      f"{flops / t['y50'] / 1e9:.2f}", f"{mm_same:.0f} / {mm_peak:.0f}"])


def batch_scaling(res, quick):
    """A 64-wide, 4-hidden-layer MLP from batch 64 to 65536, eager against the engine's two
    kernel paths: the measurement behind training large batches in chunks of 1024 rows."""
    lines = []
    widths = [64] * 5 + [1]
    for batch in ([64, 4096] if quick else [64, 512, 4096, 16384, 65536]):
        torch.manual_seed(0)
        base = mlp(widths, "cpu")
        x, y = torch.randn(batch, widths[0]), torch.randn(batch, widths[-1])
        m = copy.deepcopy(base)
        fns = {"eager (Adam fused)": make_step(m, nn.MSELoss(), torch.optim.Adam(m.parameters(), lr=1e-3, fused=True), x, y)}
        for p in ("small", "blas"):
            fns[f"engine {p}"] = (lambda e=Engine(copy.deepcopy(base), path=p): e.step(x, y))
        t = time_providers(fns, "cpu", reps=3 if quick else 5, block_seconds=0.02 if quick else 0.3)
        ref = t["eager (Adam fused)"]["y50"]
        res.add(kernel="engine_batch_scaling", provider="eager/small/blas", mode="train_step", metric="time", unit="s",
                x=f"64x4@{batch}", config={"widths": widths, "batch": batch},
                eager_s=ref, small_s=t["engine small"]["y50"], blas_s=t["engine blas"]["y50"],
                small_vs_eager=ref / t["engine small"]["y50"], blas_vs_eager=ref / t["engine blas"]["y50"])
        lines.append([str(batch)] + [fmt_time(v["y50"]) for v in t.values()] +
                     [f"{ref / t[p]['y50']:.2f}x" for p in ("engine small", "engine blas")])
    res.table("Batch scaling: engine step of a 64-wide, 4-hidden-layer MLP against eager (batches over 1024 rows "
              "train in chunks of 1024)",
              ["batch", "eager (Adam fused)", "engine small", "engine blas", "small vs eager", "blas vs eager"], lines)


def predict_table(res, quick):
    """Engine.predict against the module's forward under no_grad, over rows: the measurement
    behind predicting many rows in pieces of 256."""
    lines = []
    nets = {"seed": [10, 20, 1], "64x4": [64] * 5 + [1], "64-256-256-1": [64, 256, 256, 1]}
    for name, widths in nets.items():
        for rows in ([64, 4096] if quick else [64, 512, 4096, 65536]):
            torch.manual_seed(0)
            model, x = mlp(widths, "cpu"), torch.randn(rows, widths[0])
            engine = Engine(model)
            torch.testing.assert_close(engine.predict(x), model(x).detach(), rtol=1e-4, atol=1e-5)

            def eager(model=model, x=x):
                with torch.no_grad():
                    model(x)
            t = time_providers({"eager forward (no_grad)": eager, "engine predict()": lambda e=engine, x=x: e.predict(x)},
                               "cpu", reps=3 if quick else 5, block_seconds=0.02 if quick else 0.2)
            ref, own = t["eager forward (no_grad)"]["y50"], t["engine predict()"]["y50"]
            res.add(kernel="engine_predict", provider="eager/engine", mode="predict", metric="time", unit="s",
                    x=f"{name}@{rows}", config={"widths": widths, "rows": rows}, eager_s=ref, engine_s=own,
                    engine_vs_eager=ref / own)
            lines.append([f"{name}@{rows}", fmt_time(ref), fmt_time(own), f"{ref / own:.2f}x"])
    res.table("Prediction: engine predict() against the model's forward under torch.no_grad() (more than 256 rows "
              "run in pieces of 256, which the threads share)",
              ["MLP @ rows", "eager forward (no_grad)", "engine predict()", "engine vs eager"], lines)


def sweep(res, quick):
    lines = []
    widths = [8, 16, 32, 64, 128, 256] if quick else [8, 16, 32, 64, 96, 128, 192, 256, 384, 512]
    batches = [64, 512] if quick else [64, 256, 1024, 4096]
    for batch in batches:
        for w in widths:
            torch.manual_seed(0)
            net = [w, w, w, 1]
            x, y = torch.randn(batch, w), torch.randn(batch, 1)
            engines = {p: Engine(mlp(net, "cpu"), path=p) for p in ("small", "blas")}
            t = time_providers({p: (lambda e=e: e.step(x, y)) for p, e in engines.items()}, "cpu", reps=3 if quick else 5,
                               block_seconds=0.02 if quick else 0.05)
            ratio = t["blas"]["y50"] / t["small"]["y50"]
            auto = Engine(mlp(net, "cpu")).layer_paths(batch)[1]
            res.add(kernel="engine_sweep", provider="small/blas", mode="train_step", metric="time", unit="s",
                    x=f"{w}x{w}@{batch}", config={"width": w, "batch": batch}, small_s=t["small"]["y50"],
                    blas_s=t["blas"]["y50"], small_over_blas_speed=ratio, auto_path=auto)
            lines.append([str(batch), str(w), fmt_time(t["small"]["y50"]), fmt_time(t["blas"]["y50"]), f"{ratio:.2f}x",
                          "small" if ratio > 1 else "blas", auto])
    res.table("Kernel paths: engine step of w->w->w->1, hand kernels against BLAS (per-layer switch: a layer of more "
              "than 96 x 128 weights goes to BLAS on AVX-512, more than 64 x 96 on AVX2 and the baseline)",
              ["batch", "width", "small", "blas", "small speed / blas", "faster", "auto picks (middle layer)"], lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, short blocks: a smoke test")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also time the small/BLAS kernel paths over widths")
    p.add_argument("--batch-scaling", action="store_true",
                   help="also time a 64-wide MLP's step from batch 64 to 65536 against eager")
    p.add_argument("--predict", action="store_true", help="also time predict() against the model's forward (CPU only)")
    p.add_argument("--models", type=positive_int, default=None, help="K for the many-model table (default 256; 16 with --quick)")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_out_dir(p, args.out)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"benchmarks/engine.py: --device {device} but torch sees no CUDA GPU; nothing measured", file=sys.stderr)
        return 1
    device = select_device(device)  # under torchrun: this rank's GPU (each rank writes its own file)
    res = Results("engine", device)
    reps, block = (3, 0.02) if args.quick else (5, 0.05) if device.startswith("cuda") else (9, 0.2)  # a GPU step: tens of us
    if device.startswith("cuda"):  # the H200 targets: the seed network, and a 64-wide 4-hidden-layer MLP
        nets = [("seed 10->20->1", [10, 20, 1], 64)] + ([] if args.quick else [("64x4 hidden", [64] * 5 + [1], 65536)])
    else:
        # and a large batch, which the engine trains in chunks of 1024 rows
        nets = [("seed 10->20->1", [10, 20, 1], 64)] + ([] if args.quick else [
            ("64->256->256->1", [64, 256, 256, 1], 512), ("64x4 hidden", [64] * 5 + [1], 16384)])
    lines, failed = [], res.env.setdefault("failed_providers", [])
    res.env["timer"] = "interleaved blocks of steps, synchronized at block ends (time.perf_counter)"
    try:
        for label, widths, batch in nets:
            try:
                provs, paths = single_providers(widths, batch, not args.no_compile,
                                                steps_per_run=50 if batch <= 64 else 10, device=device)
            except Exception as e:  # noqa: BLE001 - one network's set-up must not cost the others
                record_failure(failed, label, "setting up the providers", e, "benchmarks/engine.py")
                continue
            provs = working(provs, failed, label)
            if "eager (Adam fused)" not in provs:
                continue  # no reference: nothing to compare with
            per_step, mm_peak = timed(provs, reps, block, device=device, failed=failed, case=label)
            flops = 6.0 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
            report(res, "single", label, batch, per_step, ["eager (Adam fused)"], flops, (batch, widths[1], widths[0]),
                   mm_peak, lines, {"widths": widths, "engine_paths": paths}, device=device)
            res.write(args.out)  # after each network: a run cut short keeps what it measured
    except KeyboardInterrupt:
        return interrupted(res, args.out, "during the one-model table")
    res.table("One model: training step (forward, MSE, backward, Adam), float32",
              SINGLE_COLUMNS, [[f"{l[0]} @ {nets[[n[0] for n in nets].index(l[0])][2]}", *l[1:]] for l in lines])
    res.write(args.out)
    try:
        rc = many_models(res, args, device, block, failed)
    except KeyboardInterrupt:
        return interrupted(res, args.out, "during the many-model table")
    if device.startswith("cuda") and not args.quick:
        try:  # last: a time limit that cuts it costs no other table
            tf32_table(res, args, device, reps, block, failed)
        except KeyboardInterrupt:
            return interrupted(res, args.out, "during the TF32 table")
    base = res.write(args.out)
    print(f"results: {base}.json, {base}.md")
    return rc


SINGLE_COLUMNS = ["network @ batch", "provider", "median per step", "p20 - p80", "steps/s", "vs eager (Adam fused)",
                  "GFLOP/s", "torch.mm GFLOP/s (same shape / 1024^3)"]


def tf32_table(res, args, device, reps, block, failed):
    """The 64-wide, 4-hidden-layer MLP again with TF32 allowed for float32 products, for
    eager and the engine alike (torch.set_float32_matmul_precision("high")): in IEEE float32
    both run on the FMA units, and the 5x target is predicted missed there; TF32 puts the
    products on the tensor cores. Restores the setting it found."""
    label, widths, batch = "64x4 hidden, TF32", [64] * 5 + [1], 65536
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        try:
            provs, paths = single_providers(widths, batch, False, steps_per_run=10, device=device)
        except Exception as e:  # noqa: BLE001
            record_failure(failed, label, "setting up the providers", e, "benchmarks/engine.py")
            return
        provs = working(provs, failed, label)
        if "eager (Adam fused)" not in provs:
            return
        per_step, mm_peak = timed(provs, reps, block, device=device, failed=failed, case=label)
        flops = 6.0 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        lines = []
        report(res, "single", label, batch, per_step, ["eager (Adam fused)"], flops, (batch, widths[1], widths[0]),
               mm_peak, lines, {"widths": widths, "engine_paths": paths, "float32_matmul_precision": "high"},
               device=device)
    finally:
        torch.set_float32_matmul_precision(before)
    res.table("One model with TF32 allowed (torch.set_float32_matmul_precision('high')) for eager and engine alike",
              SINGLE_COLUMNS, [[f"{l[0]} @ {batch}", *l[1:]] for l in lines])
    res.write(args.out)


def interrupted(res, out, where) -> int:
    """Ctrl-C (SIGINT, as gpu_check.sh's time limit sends): write what was measured, exit 130."""
    res.env["interrupted"] = where
    print(f"benchmarks/engine.py: interrupted {where}; writing what was measured", file=sys.stderr, flush=True)
    res.write(out)
    return 130


def many_models(res, args, device, block, failed) -> int:
    K = args.models or (16 if args.quick else 256)
    widths, batch = [10, 20, 1], 64
    try:
        provs = many_providers(K, widths, batch, steps_per_run=5 if args.quick else 20, device=device)
    except Exception as e:  # noqa: BLE001
        record_failure(failed, f"{K} x seed", "setting up the providers", e, "benchmarks/engine.py")
        res.write(args.out)
        return 1
    provs = working(provs, failed, f"{K} x seed")
    refs = ["Python loop of K eager models", "torch.func.vmap (stacked, Adam fused)"]
    if not all(r in provs for r in refs):
        print(f"benchmarks/engine.py: no many-model table: a reference failed ({failed})", file=sys.stderr)
        return 1
    per_step, mm_peak = timed(provs, 3 if args.quick else (5 if device.startswith("cuda") else 7), block, device=device,
                              reference="Python loop of K eager models", failed=failed, case=f"{K} x seed")
    flops = 6.0 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:])) * K
    lines = []
    report(res, "many", f"{K} x seed", batch, per_step, refs, flops, (batch, widths[1], widths[0]), mm_peak, lines, {"widths": widths, "models": K}, device=device)
    res.table(f"{K} seed networks (10->20->1) at once, batch 64 each: one step of all of them",
              ["models", "provider", "median per step of all", "p20 - p80", "steps/s", "vs Python loop", "vs vmap",
               "GFLOP/s", "torch.mm GFLOP/s (same shape / 1024^3)"], lines)
    if args.sweep and not device.startswith("cuda"):
        sweep(res, args.quick)
    if args.batch_scaling and not device.startswith("cuda"):
        batch_scaling(res, args.quick)
    if args.predict and not device.startswith("cuda"):
        predict_table(res, args.quick)
    res.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
