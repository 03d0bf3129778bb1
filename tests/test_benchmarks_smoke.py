"""The benchmark scripts run and write their result files (a smoke run, not a timing)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ops_benchmark_quick_run_writes_results(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ops.py"), "--quick", "--no-compile",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files), files
    data = json.load(open(os.path.join(tmp_path, next(f for f in files if f.endswith(".json")))))
    kernels = {row["kernel"] for row in data["rows"]}
    assert kernels == {"linear_relu", "mse_loss", "adam"}
    assert all(row["y20"] <= row["y50"] <= row["y80"] and row["y50"] > 0 for row in data["rows"])
    assert data["environment"]["aiaas_fast"]["version"]


@pytest.mark.slow
def test_train_benchmark_quick_run_writes_results(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train.py"), "--quick", "--no-compile",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(os.path.join(tmp_path, next(f for f in os.listdir(tmp_path) if f.endswith(".json")))))
    providers = {row["provider"] for row in data["rows"]}
    assert {"eager (Adam foreach)", "eager (Adam fused)", "aiaas_fast"} <= providers
    assert all(row["y50"] > 0 for row in data["rows"])


@pytest.mark.slow
def test_engine_benchmark_quick_run_writes_results(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "engine.py"), "--quick", "--no-compile",
                        "--sweep", "--batch-scaling", "--predict", "--models", "4", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(os.path.join(tmp_path, next(f for f in os.listdir(tmp_path) if f.endswith(".json")))))
    providers = {row["provider"] for row in data["rows"]}
    assert {"eager (Adam fused)", "engine step()", "engine run()", "torch.func.vmap (stacked, Adam fused)",
            "engine run() (K models, own rows)", "small/blas", "eager/small/blas", "eager/engine"} <= providers
    assert all(row["y50"] > 0 for row in data["rows"] if "y50" in row)
    if not __import__("torch").cuda.is_available():
        r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "engine.py"), "--device", "cuda"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "no CUDA GPU; nothing measured" in r.stderr


def test_a_failing_engine_provider_is_left_out_and_recorded():
    # On a rare GPU run one provider that fails must not cost the others' numbers.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import engine as bench
    finally:
        sys.path.pop(0)

    def broken():
        raise RuntimeError("no kernel image\nsecond line")

    failed = []
    kept = bench.working({"good": (lambda: None, 1), "bad": (broken, 1)}, failed, "seed")
    assert list(kept) == ["good"]
    assert failed == [{"case": "seed", "provider": "bad", "error": "RuntimeError: no kernel image"}]


def test_do_bench_takes_the_providers_in_turns_and_pools_their_samples(monkeypatch):
    # A GPU's clocks drift over a run; one provider timed wholly after another carries it all.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "all" and rep == harness.DO_BENCH_ROUND_MS
        name = fn()
        calls.append(name)
        if name == "bad" and calls.count("bad") == 2:
            raise RuntimeError("launch failed")
        return {"a": [1.0, 3.0], "b": [2.0, 2.0, 8.0], "bad": [1.0]}[name]  # milliseconds

    monkeypatch.setattr(harness, "_do_bench", lambda: fake_do_bench)
    failed = []
    out = harness.time_providers({"a": lambda: "a", "b": lambda: "b", "bad": lambda: "bad"}, device="cuda",
                                 failed=failed, case="mm")
    rounds = harness.DO_BENCH_ROUNDS
    assert calls[:6] == ["a", "b", "bad", "a", "b", "bad"]  # in turns; "bad" drops out in round 2
    assert calls.count("a") == calls.count("b") == rounds and calls.count("bad") == 2
    assert set(out) == {"a", "b"}
    assert out["a"]["y50"] == pytest.approx(2.0e-3)  # median of [1, 3] * rounds
    assert out["b"]["y50"] == pytest.approx(2.0e-3) and out["b"]["y80"] == pytest.approx(8.0e-3)
    assert failed == [{"case": "mm", "provider": "bad", "error": "RuntimeError: launch failed"}]


@pytest.mark.parametrize("name,local_rank,expected", [("cuda", None, 3), ("cuda:1", None, 1), ("cuda", "2", 2)])
def test_select_device_makes_the_gpu_current_with_an_index(monkeypatch, name, local_rank, expected):
    # torch.cuda.set_device refuses a device without an index ("cuda"): every GPU benchmark
    # died at start-up on it. Checked here with torch.cuda stubbed (CI has no GPU).
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    chosen = []

    def set_device(d):
        assert isinstance(d, int), f"set_device({d!r}): torch needs an index"
        chosen.append(d)

    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness.torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(harness.torch.cuda, "set_device", set_device)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert harness.select_device(name).startswith("cuda") and chosen == [expected]


@pytest.mark.parametrize("script,args,message", [
    ("ops.py", ["--out", "{blocked}/results"], "--out {blocked}/results: cannot write there"),
    ("engine.py", ["--out", "{blocked}/results"], "--out {blocked}/results: cannot write there"),
    ("ops.py", ["--device", "foo"], "argument --device: not a device: 'foo'"),
    ("train.py", ["--reps", "0"], "argument --reps: must be >= 1, got 0"),
    ("engine.py", ["--models", "-4"], "argument --models: must be >= 1, got -4"),
    ("triton_ops.py", ["--device", "tpu"], "argument --device:"),
])
def test_bad_benchmark_arguments_are_one_line_before_any_timing(tmp_path, script, args, message):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    args = [a.format(blocked=blocked) for a in args]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message.format(blocked=blocked) in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_summarize_refuses_to_pool_different_benchmarks(tmp_path):
    for name in ("ops", "train"):
        (tmp_path / f"{name}-cpu-2026-11-29T0000.json").write_text(json.dumps(
            {"environment": {"benchmark": name, "date": "2026-11-29", "device_name": "cpu", "threads": 2, "torch": "x"},
             "rows": []}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "summarize.py"),
                        *sorted(str(p) for p in tmp_path.iterdir())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "different benchmarks (ops, train)" in r.stderr, r.stderr


def test_summarize_takes_renamed_files_of_one_benchmark(tmp_path):
    # Files without a recorded benchmark and without the benchmarks' own names are not refused.
    row = {"kernel": "linear_relu", "x": "64", "provider": "eager", "y50": 1e-3}
    for name in ("baseline.json", "candidate.json"):
        (tmp_path / name).write_text(json.dumps(
            {"environment": {"date": "2026-11-29", "device_name": "cpu", "threads": 2, "torch": "x"}, "rows": [row]}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "summarize.py"),
                        str(tmp_path / "baseline.json"), str(tmp_path / "candidate.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Summary of 2 runs" in r.stdout, r.stderr


def test_summarize_engine_runs_with_a_sweep(tmp_path):
    # engine.py --sweep adds rows without a time: the engine table keeps its own ratios and the
    # sweep gets its own table (it fell into the ops table, without the sweep, before).
    env = {"benchmark": "engine", "date": "2026-11-29", "device_name": "cpu", "threads": 2, "torch": "x"}
    for i, speed in enumerate((1.5, 2.5, 2.0)):
        rows = [{"kernel": "engine", "x": "seed", "provider": "engine step()", "y50": 1e-5 * (i + 1), "vs_eager": 40.0 + i}]
        if i < 2:  # one run without the sweep
            rows.append({"kernel": "engine_sweep", "x": "8x8@64", "provider": "small/blas", "small_s": 1e-6,
                         "blas_s": 2e-6, "small_over_blas_speed": speed, "auto_path": "small"})
            rows.append({"kernel": "engine_batch_scaling", "x": "64x4@65536", "provider": "eager/small/blas",
                         "eager_s": 1.0, "small_s": 1 / speed, "blas_s": 1.0, "small_vs_eager": speed, "blas_vs_eager": 1.0})
            rows.append({"kernel": "engine_predict", "x": "64x4@4096", "provider": "eager/engine", "eager_s": 1.0,
                         "engine_s": 1 / speed, "engine_vs_eager": speed})
        (tmp_path / f"engine-cpu-2026-11-29T000{i}.json").write_text(json.dumps({"environment": env, "rows": rows}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "summarize.py"),
                        *sorted(str(p) for p in tmp_path.iterdir())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| seed | engine step() | 20.0 us | 41.00x (40.00 - 42.00) |" in r.stdout, r.stdout
    assert "| 8x8@64 | 2.00x (1.50 - 2.50) | small |" in r.stdout, r.stdout
    assert "| 64x4@65536 | 2.00x (1.50 - 2.50) | 1.00x (1.00 - 1.00) |" in r.stdout, r.stdout
    assert "| 64x4@4096 | 2.00x (1.50 - 2.50) |" in r.stdout, r.stdout
