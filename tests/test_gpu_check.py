"""scripts/gpu_check.sh is run rarely, on a machine that keeps nothing: its pieces are
checked here on every change (syntax, and the report on a synthetic run)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_script_refuses_a_machine_without_nvidia_smi(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nvidia-smi not found" in r.stdout
    # What comes back from a device run: the log and the packed extras, however the script ends.
    assert "nvidia-smi not found" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "extras.tar.gz").exists() and sorted(os.listdir(tmp_path)) == ["extras.tar.gz", "log.txt"]


def test_script_refuses_a_scratch_folder_with_an_old_run_in_it(tmp_path):
    # An old run's results would mix into the new report: a non-empty GPU_CHECK_WORK is refused.
    work = tmp_path / "work"
    work.mkdir()
    (work / "results.json").write_text("{}")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, GPU_CHECK_WORK=str(work)))
    assert r.returncode == 2 and "is not empty" in r.stdout
    assert (work / "results.json").read_text() == "{}"  # left as it was


@pytest.mark.slow
def test_report_from_a_synthetic_run(tmp_path):
    # Its synthetic run is Triton on the CPU (the interpreter): on the GPU machine, where
    # gpu_check.sh runs this file, it would cost the test step's time and prove nothing more
    # than the real report that follows it.
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU machine: gpu_check.sh writes the real report")
    (tmp_path / "nvidia-smi.csv").write_text("name, driver_version, memory.total [MiB], compute_cap\nNVIDIA H200, 580.1, 143771 MiB, 9.0\n")
    (tmp_path / "tests-gpu.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" skipped="2" time="12.5">'
        '<testcase classname="tests.test_cuda_ops" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda_ops" name="test_b"/></testsuite></testsuites>')
    (tmp_path / "tests-ops.xml").write_text('<testsuite name="pytest" tests="5" failures="0" errors="0" skipped="1" time="3"/>')
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_ops.py"), "--quick", "--no-compile",
                        "--device", "cpu", "--out", str(tmp_path / "bench")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # benchmarks/cuda_ops.py writes its own row format, and a run may leave a truncated file.
    (tmp_path / "bench" / "cuda-ops-x.json").write_text(json.dumps({"meta": {"gpu": "H200", "notes": [
        "linear_relu forward, aiaas_fast native (cutlass) ran: cutlass_sm90"]}, "rows": [
        {"bench": "linear_relu fwd", "shape": "8192^3 bf16", "provider": "aiaas_fast native", "seconds": 0.0021,
         "metric": "TFLOP/s", "value": 520.0, "ratio": 0.97}]}))
    (tmp_path / "bench" / "cut.json").write_text('{"rows": [')
    (tmp_path / "bench" / "engine-cuda-x.json").write_text(json.dumps({"environment": {"failed_providers": [
        {"case": "seed 10->20->1", "provider": "engine step()", "error": "CompilationError: boom"}]}, "rows": []}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check_report.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(tmp_path / "results.json"))
    assert data["gpu"]["name"] == "NVIDIA H200" and data["tests"]["failures"] == 1 and data["tests"]["tests"] == 15
    assert data["tests"]["failed"] == ["tests.test_cuda_ops::test_a"] and set(data["tests"]["runs"]) == {"tests-gpu.xml", "tests-ops.xml"}
    assert {row["kernel"] for row in data["benchmarks"]} == {"linear_relu", "mse_loss", "adam", "linear_relu fwd", "engine"}
    assert len(data["unreadable_benchmark_files"]) == 1
    assert any(row["provider"] == "triton" for row in data["benchmarks"])
    assert data["build_info"]["version"]
    assert "tests: 15 run, 1 failed" in r.stdout and "failed: tests.test_cuda_ops::test_a" in r.stdout
    assert data["failed_providers"][0]["provider"] == "engine step()"
    assert "FAILED" in r.stdout and "CompilationError: boom" in r.stdout
    assert "note: linear_relu forward, aiaas_fast native (cutlass) ran: cutlass_sm90" in r.stdout
    assert data["missing_benchmarks"] == [] and data["interrupted_benchmarks"] == []
    assert "520.0 TFLOP/s" in r.stdout and "0.97x vs TFLOP/s" in r.stdout  # cuda_ops rows: the rate, the old ratio label


def test_report_names_missing_and_cut_short_benchmarks(tmp_path):
    # A benchmark killed before its first write leaves no file; one interrupted says so in its file.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "engine-cuda-x.json").write_text(json.dumps(
        {"environment": {"interrupted": "during the many-model table"}, "rows": []}))
    # gpu_check.sh's step statuses: a test run cut short at its limit (124), one that failed (1)
    (tmp_path / "steps.txt").write_text("tests-gpu 1\ntests-ops 124\nengine 0\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check_report.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(tmp_path / "results.json"))
    assert data["missing_benchmarks"] == ["triton_ops", "cuda-ops"]
    assert data["interrupted_benchmarks"] == ["engine-cuda-x.json"]
    assert "MISSING (no results file): triton_ops, cuda-ops" in r.stdout and "cut short" in r.stdout
    assert data["steps"] == {"tests-gpu": 1, "tests-ops": 124, "engine": 0} and data["cut_short_steps"] == ["tests-ops"]
    last = r.stdout.strip().splitlines()[-6:]  # the summary ends the output (a tool may keep only its tail)
    assert any(l.startswith("STEPS CUT SHORT") and "tests-ops" in l for l in last), last
    assert any(l == "steps that exited non-zero: tests-gpu (1)" for l in last), last
    assert any(l.startswith("tests: none run") for l in last), last


def test_every_gpu_test_file_is_in_the_script():
    # A GPU test file left out of the script's pytest list would never run anywhere.
    import re

    script = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    listed = set(re.findall(r"tests/(test_\w+\.py)", script))
    for name in listed:
        assert os.path.exists(os.path.join(ROOT, "tests", name)), f"gpu_check.sh runs tests/{name}, which does not exist"
    for name in ("test_cuda_ops.py", "test_engine_cuda.py", "test_ensemble_cuda.py", "test_fused_mlp.py", "test_backends.py"):
        assert name in listed, f"tests/{name} has GPU cases but gpu_check.sh does not run it"


def test_step_time_limits_fit_the_eight_minutes():
    # The issue's budget for the whole check: the steps' time limits must add up to at most 8 minutes.
    import re

    script = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    # A limit and the grace before a kill: `timeout [--signal=INT] [--kill-after=K] LIMIT cmd`,
    # or the script's `timed NAME LIMIT cmd` (a kill GRACE s after the limit).
    steps = re.findall(r"\btimeout ((?:--\S+ )*)(\d+) ", script)
    limits = [int(limit) + sum(int(k) for k in re.findall(r"--kill-after=(\d+)", opts)) for opts, limit in steps]
    grace = re.search(r"timed\(\) \{.*?timeout --signal=INT --kill-after=(\d+) \"\$limit\"", script, re.S)
    assert grace, "timed() no longer runs `timeout --signal=INT --kill-after=K \"$limit\"`: update this test"
    limits += [int(limit) + int(grace.group(1)) for limit in re.findall(r"\btimed [\w-]+ (\d+) ", script)]
    # The steps without a limit (nvidia-smi, the imports, the report) take some 15-25 s more.
    assert len(limits) >= 6 and sum(limits) <= 455, limits
    assert len(re.findall(r"\btimed [\w-]+ \d+ ", script)) == 5, "the two test runs and three benchmarks are timed"
