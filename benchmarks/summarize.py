"""Combines several runs of a benchmark into one table: for each (kernel, shape, provider)
the median over runs of each run's median time, and the range of the ratio over runs.

    python benchmarks/summarize.py benchmarks/results/ops-cpu-2026-11-29T*.json [--out FILE.md]
    python benchmarks/summarize.py benchmarks/results/engine-cpu-*.json   # rows with vs_* ratios

On a shared machine one run is not to be trusted: this shows how far the runs agree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections import defaultdict
from typing import Optional


def _normalized(run: dict) -> dict:
    """benchmarks/cuda_ops.py writes {meta, rows of bench/shape/seconds}: as the harness's rows,
    its own reference by name, rows without a time (the copy bandwidth) left out."""
    if "meta" not in run:
        return run
    meta = run["meta"]
    env = {"date": meta.get("date"), "device_name": meta.get("gpu"), "threads": "-", "torch": meta.get("torch")}
    rows = [{"kernel": r["bench"], "x": r["shape"], "provider": r["provider"], "y50": r["seconds"],
             "ratio_vs": r.get("ratio_vs") if r.get("ratio_vs") != "copy bandwidth" else None}
            for r in run.get("rows", []) if r.get("seconds") is not None]
    return {"environment": env, "rows": rows}


def _benchmark_of(path: str, run: dict) -> Optional[str]:
    """The benchmark a results file comes from: recorded in it, else from a name as the
    benchmarks write it (ops-cpu-2026-11-29T0121.json: ops); None when neither says."""
    env = run.get("environment") or {}
    if env.get("benchmark"):
        return env["benchmark"]
    m = re.match(r"([a-z_]+)-(cpu|cuda)-\d{4}-", os.path.basename(path))
    return m.group(1) if m else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    runs = []
    for path in args.files:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    kinds = {_benchmark_of(path, run) for path, run in zip(args.files, runs)} - {None}
    if len(kinds) > 1:
        print(f"error: these files come from different benchmarks ({', '.join(sorted(kinds))}); summarize one "
              "benchmark's runs at a time", file=sys.stderr)
        return 2
    runs = [_normalized(run) for run in runs]
    times = defaultdict(dict)  # key -> {run index: median}: a provider may be missing from a run
    order = []
    ref_of = {}  # (kernel, shape) -> the reference a row names (ratio_vs), where it names one
    for run_index, run in enumerate(runs):
        for row in run["rows"]:
            if "y50" not in row:  # not a timing (engine.py --sweep's path table)
                continue
            key = (row["kernel"], str(row["x"]), row["provider"])
            if key not in times:
                order.append(key)
            times[key][run_index] = row["y50"]
            if row.get("ratio_vs"):
                ref_of.setdefault((row["kernel"], str(row["x"])), row["ratio_vs"])
    sweep = _sweep_table(runs)
    timed = [row for run in runs for row in run["rows"] if "y50" in row]
    if timed and all(any(k.startswith("vs_") for k in row) for row in timed):
        return _summarize_own_ratios(runs, args.out, sweep)
    refs = {"linear_relu": "eager", "mse_loss": "eager", "adam": "fused"}
    lines = [f"Summary of {len(runs)} runs ({', '.join(r['environment']['date'] for r in runs)}) on "
             f"{runs[0]['environment']['device_name']}, {runs[0]['environment']['threads']} threads, "
             f"torch {runs[0]['environment']['torch']}.", "",
             "| kernel | shape | provider | median time | ratio vs reference (median, min - max over runs) |",
             "|---|---|---|---|---|"]
    for kernel, x, provider in order:
        ref_name = ref_of.get((kernel, x), refs.get(kernel))
        ref, own = times.get((kernel, x, ref_name), {}), times[(kernel, x, provider)]
        ratios = [ref[i] / own[i] for i in own if i in ref]  # the same run's reference only
        med = statistics.median(own.values())
        unit = f"{med * 1e3:.2f} ms" if med >= 1e-3 else f"{med * 1e6:.1f} us"
        ratio = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f}) vs {ref_name}"
                 if ratios else "")
        lines.append(f"| {kernel} | {x} | {provider} | {unit} | {ratio} |")
    text = "\n".join(lines + sweep) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def _sweep_table(runs) -> list:
    """benchmarks/engine.py --sweep's, --batch-scaling's and --predict's rows (hand kernels against BLAS per width and
    batch; the engine against eager over batches), as
    table lines: the speed ratio's median over runs and its range; [] when no run has them."""
    ratios, auto = defaultdict(list), {}
    for run in runs:
        for row in run["rows"]:
            if row.get("kernel") == "engine_sweep" and "small_over_blas_speed" in row:
                ratios[str(row["x"])].append(row["small_over_blas_speed"])
                auto[str(row["x"])] = row.get("auto_path", "")
    lines = []
    if ratios:
        lines = ["", "Kernel paths (engine.py --sweep): engine step of w->w->w->1, hand kernels' speed over BLAS's, "
                 "median over runs (min - max).", "", "| width x width @ batch | small speed / blas | auto picks |",
                 "|---|---|---|"]
        for x, r in ratios.items():
            lines.append(f"| {x} | {statistics.median(r):.2f}x ({min(r):.2f} - {max(r):.2f}) | {auto[x]} |")
    scaling = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for row in run["rows"]:
            if row.get("kernel") == "engine_batch_scaling":
                for k in ("small_vs_eager", "blas_vs_eager"):
                    scaling[str(row["x"])][k].append(row[k])
    if scaling:
        span = lambda r: f"{statistics.median(r):.2f}x ({min(r):.2f} - {max(r):.2f})"  # noqa: E731
        lines += ["", "Batch scaling (engine.py --batch-scaling): engine step of a 64-wide, 4-hidden-layer MLP against eager, "
                  "median over runs (min - max).", "", "| MLP @ batch | small vs eager | blas vs eager |", "|---|---|---|"]
        for x, c in scaling.items():
            lines.append(f"| {x} | {span(c['small_vs_eager'])} | {span(c['blas_vs_eager'])} |")
    predict = defaultdict(list)
    for run in runs:
        for row in run["rows"]:
            if row.get("kernel") == "engine_predict":
                predict[str(row["x"])].append(row["engine_vs_eager"])
    if predict:
        lines += ["", "Prediction (engine.py --predict): engine predict() against the model's forward under no_grad, "
                  "median over runs (min - max).", "", "| MLP @ rows | engine vs eager |", "|---|---|"]
        for x, r in predict.items():
            lines.append(f"| {x} | {statistics.median(r):.2f}x ({min(r):.2f} - {max(r):.2f}) |")
    return lines


def _summarize_own_ratios(runs, out, sweep=()) -> int:
    """Runs whose rows carry their own ratios (benchmarks/engine.py: vs_<reference> keys)."""
    cells = defaultdict(lambda: defaultdict(list))
    order = []
    for run in runs:
        for row in run["rows"]:
            if "y50" not in row:  # the sweep's rows: their own table
                continue
            key = (str(row["x"]), row["provider"])
            if key not in cells:
                order.append(key)
            cells[key]["time"].append(row["y50"])
            for k, v in row.items():
                if k.startswith("vs_"):
                    cells[key][k].append(v)
    refs = list(dict.fromkeys(k for key in order for k in cells[key] if k != "time"))
    lines = [f"Summary of {len(runs)} runs ({', '.join(r['environment']['date'] for r in runs)}) on "
             f"{runs[0]['environment']['device_name']}, {runs[0]['environment']['threads']} threads, "
             f"torch {runs[0]['environment']['torch']}: median over runs (min - max).", "",
             "| case | provider | median time | " + " | ".join(r[3:].replace("_", " ") for r in refs) + " |",
             "|---|---|---|" + "---|" * len(refs)]
    for x, provider in order:
        c = cells[(x, provider)]
        med = statistics.median(c["time"])
        unit = f"{med * 1e3:.2f} ms" if med >= 1e-3 else f"{med * 1e6:.1f} us"
        ratio = [f"{statistics.median(c[r]):.2f}x ({min(c[r]):.2f} - {max(c[r]):.2f})" if c.get(r) else "" for r in refs]
        lines.append(f"| {x} | {provider} | {unit} | " + " | ".join(ratio) + " |")
    text = "\n".join(lines + list(sweep)) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
