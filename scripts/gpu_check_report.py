"""Writes OUTDIR/results.json for scripts/gpu_check.sh from what the run left in OUTDIR
(nvidia-smi.csv, tests*.xml, bench/*.json) and prints a short table. Runs on a CPU too (the
tests call it on a synthetic folder), so it is not first run on the GPU machine."""
from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def gather(out: str) -> dict:
    import torch

    result = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    try:
        import aiaas_fast

        result["build_info"] = aiaas_fast.build_info()
    except Exception as e:  # noqa: BLE001  (a broken install is itself a result)
        result["build_info"] = f"import failed: {e}"
    smi = os.path.join(out, "nvidia-smi.csv")
    if os.path.exists(smi):
        lines = [l.strip() for l in open(smi) if l.strip()]
        if len(lines) > 1:
            keys = [k.strip() for k in lines[0].split(",")]
            result["gpu"] = dict(zip(keys, [v.strip() for v in lines[1].split(",")]))
    # One results file per pytest run (gpu_check.sh runs two): totals, per run, and the
    # names of the tests that failed.
    runs = {}
    for xml in sorted(glob.glob(os.path.join(out, "tests*.xml"))):
        try:
            root = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as e:
            result.setdefault("unreadable_test_files", []).append(f"{xml}: {e}")
            continue
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        run = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        run["time_s"] = float(suite.get("time", 0))
        run["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
        runs[os.path.basename(xml)] = run
    if runs:
        result["tests"] = {k: sum(r[k] for r in runs.values()) for k in ("tests", "failures", "errors", "skipped", "time_s")}
        result["tests"]["failed"] = [name for r in runs.values() for name in r["failed"]]
        result["tests"]["runs"] = runs
    else:
        result["tests"] = None
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "bench", "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # a benchmark killed mid-write: report it, keep the rest
            result.setdefault("unreadable_benchmark_files", []).append(f"{path}: {e}")
            continue
        result.setdefault("benchmark_environment", data.get("environment") or data.get("meta"))
        # benchmarks/cuda_ops.py's notes: which GEMM each native provider ran, compile failures
        result.setdefault("notes", []).extend((data.get("meta") or {}).get("notes", []))
        for f in (data.get("environment") or data.get("meta") or {}).get("failed_providers", []):  # left out of a run
            result.setdefault("failed_providers", []).append(f)
            rows.append({"kernel": os.path.basename(path).split("-")[0], "x": f.get("case"),
                         "provider": f.get("provider"), "error": f.get("error")})
        for r in data.get("rows", []):
            if "bench" in r:  # benchmarks/cuda_ops.py's rows
                rows.append({"kernel": r.get("bench"), "x": r.get("shape"), "provider": r.get("provider"),
                             "y50": r.get("seconds"), "ratio": r.get("ratio"),
                             "ratio_vs": r.get("ratio_vs") or r.get("metric"), "value": r.get("value"),
                             "metric": r.get("metric")})
            else:
                row = {k: r.get(k) for k in ("kernel", "x", "provider", "y50", "y20", "y80", "ratio", "ratio_vs",
                                             "tflops", "gbps", "fraction_of_copy")}
                own = [k for k in r if k.startswith("vs_")]  # benchmarks/engine.py: ratios named vs_<reference>
                if row["ratio"] is None and own:
                    row["ratio"], row["ratio_vs"] = r[own[0]], own[0][3:]
                rows.append(row)
    result["benchmarks"] = rows
    # gpu_check.sh's timed steps, "NAME STATUS" a line: 124 (SIGINT at the limit) or 137 (killed
    # after it) mean the step was cut short, and a test run's totals are then a part of it.
    steps = {}
    if os.path.exists(os.path.join(out, "steps.txt")):
        for line in open(os.path.join(out, "steps.txt")):
            name, _, rc = line.strip().rpartition(" ")
            if name and rc.lstrip("-").isdigit():
                steps[name] = int(rc)
    result["steps"] = steps
    result["cut_short_steps"] = [name for name, rc in steps.items() if rc in (124, 137)]
    # A benchmark that wrote no file (killed before its first write, or never started) says so.
    names = {os.path.basename(p).split("-")[0] for p in glob.glob(os.path.join(out, "bench", "*.json"))}
    result["missing_benchmarks"] = [b for b in EXPECTED_BENCHMARKS if b.split("-")[0] not in names]
    envs = [json_or_none(p) for p in sorted(glob.glob(os.path.join(out, "bench", "*.json")))]
    result["interrupted_benchmarks"] = sorted(
        os.path.basename(p) for p, d in zip(sorted(glob.glob(os.path.join(out, "bench", "*.json"))), envs)
        if d and ((d.get("environment") or {}).get("interrupted")
                  or any("interrupted" in n for n in (d.get("meta") or {}).get("notes", []))))
    return result


#: The file-name stems of what scripts/gpu_check.sh runs (triton_ops-cuda-..., cuda-ops-..., engine-cuda-...).
EXPECTED_BENCHMARKS = ("triton_ops", "cuda-ops", "engine")


def json_or_none(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _rate(r: dict) -> str:
    """The row's rate: TFLOP/s, GB/s (with its fraction of the copy bandwidth) or cuda_ops' own metric."""
    if isinstance(r.get("tflops"), (int, float)):
        return f"{r['tflops']:.1f} TFLOP/s"
    if isinstance(r.get("gbps"), (int, float)):
        frac = r.get("fraction_of_copy")
        return f"{r['gbps']:.0f} GB/s" + (f" ({frac:.0%} of copy)" if isinstance(frac, (int, float)) else "")
    if isinstance(r.get("value"), (int, float)) and r.get("metric") in ("TFLOP/s", "GB/s"):
        return f"{r['value']:.1f} {r['metric']}"
    return ""


def table(result: dict) -> str:
    out = []
    gpu = result.get("gpu") or {}
    out.append(f"GPU {gpu.get('name', '?')}, driver {gpu.get('driver_version', '?')}, torch {result['torch']}, triton {result['triton']}")
    out.append(f"{'kernel':<12} {'case':<40} {'provider':<18} {'median':>12} {'ratio':>28}  rate")
    for r in result["benchmarks"]:
        median = f"{r['y50'] * 1e6:>10.1f}us" if isinstance(r.get("y50"), (int, float)) else f"{'-':>12}"
        ratio = (f"{r['ratio']:>8.2f}x vs {str(r.get('ratio_vs')):<16}" if isinstance(r.get("ratio"), (int, float))
                 else f"{'':>28}")
        rate = _rate(r)
        if r.get("error"):
            median, ratio, rate = f"{'FAILED':>12}", f" {r['error'][:120]}", ""
        out.append(f"{str(r['kernel']):<12} {str(r['x']):<40} {str(r['provider']):<18} {median} {ratio}  {rate}")
    out += [f"note: {n}" for n in result.get("notes", [])]
    # The summary last: a device tool may bring back only the end of the output.
    t = result.get("tests")
    if t:
        out += [f"  failed: {name}" for name in t["failed"][:30]]
    out.append("tests: none run" if not t else
               f"tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped ({t['time_s']:.0f} s)")
    cut = result.get("cut_short_steps") or []
    if cut:
        out.append(f"STEPS CUT SHORT by their time limit (totals above count only what ran): {', '.join(cut)}")
    failed_steps = [f"{n} ({rc})" for n, rc in (result.get("steps") or {}).items() if rc not in (0, 124, 137)]
    if failed_steps:
        out.append(f"steps that exited non-zero: {', '.join(failed_steps)}")
    if result.get("missing_benchmarks"):
        out.append(f"MISSING (no results file): {', '.join(result['missing_benchmarks'])}")
    if result.get("interrupted_benchmarks"):
        out.append(f"cut short by the time limit: {', '.join(result['interrupted_benchmarks'])}")
    return "\n".join(out)


def main(argv=None) -> int:
    out = (argv or sys.argv[1:])[0]
    result = gather(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
