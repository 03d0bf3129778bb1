"""Writes OUTDIR/results.json for scripts/gpu_check.sh from what the run left in OUTDIR
(nvidia-smi.csv, tests.xml, bench/*.json) and prints a short table. Runs on a CPU too (the
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
    xml = os.path.join(out, "tests.xml")
    if os.path.exists(xml):
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result["tests"]["time_s"] = float(suite.get("time", 0))
    else:
        result["tests"] = None
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "bench", "*.json"))):
        data = json.load(open(path))
        result.setdefault("benchmark_environment", data["environment"])
        for r in data["rows"]:
            rows.append({k: r.get(k) for k in ("kernel", "x", "provider", "y50", "y20", "y80", "ratio", "ratio_vs", "tflops",
                                               "gbps", "fraction_of_copy")})
    result["benchmarks"] = rows
    return result


def table(result: dict) -> str:
    out = []
    gpu = result.get("gpu") or {}
    out.append(f"GPU {gpu.get('name', '?')}, driver {gpu.get('driver_version', '?')}, torch {result['torch']}, triton {result['triton']}")
    t = result.get("tests")
    out.append("tests: none run" if not t else
               f"tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped ({t['time_s']:.0f} s)")
    out.append(f"{'kernel':<12} {'case':<40} {'provider':<18} {'median':>12} {'ratio':>24}")
    for r in result["benchmarks"]:
        out.append(f"{r['kernel']:<12} {str(r['x']):<40} {r['provider']:<18} {r['y50'] * 1e6:>10.1f}us "
                   f"{r['ratio']:>8.2f}x vs {r['ratio_vs']:<12}")
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
