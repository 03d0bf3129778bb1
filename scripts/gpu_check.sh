#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR: on a Linux machine with an NVIDIA GPU and no network (torch,
# triton, nvcc, cmake, ninja, pybind11, scikit-build-core preinstalled), build and install
# aiaas_fast without downloading anything, run the test suite on the GPU for every backend,
# run the GPU benchmarks, and write OUTDIR/log.txt and OUTDIR/results.json; a short table last.
# Budget: 8 minutes. Every step's exit status is checked; a failed test run does not stop the
# benchmarks, but the script then exits non-zero.
#
# OUTDIR gets three files (a device tool may bring back only a few): log.txt, results.json
# (every test total and benchmark row) and extras.tar.gz (the build log, the pytest results
# files, the benchmarks' own JSON and Markdown). The work itself happens in a scratch folder
# ($GPU_CHECK_WORK, default a new one under /tmp), packed into OUTDIR however the script ends.
#
# CUTLASS's headers (for the CUTLASS GEMMs) come from the nvidia-cutlass package or from
# build/cutlass-headers/include: where the GPU machine has neither and no network, run
# scripts/check_cuda_kernels.sh here first (it unpacks them there, 27 MB) and bring that folder.
set -euo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$WORK"
if [[ -n "$(ls -A "$WORK")" ]]; then  # an old run's results would mix into this one's report
  echo "GPU_CHECK_WORK=$WORK is not empty: give an empty or new folder"; exit 2
fi
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
PY="${PYTHON:-python3}"
status=0
finish() {  # on any exit: results.json and the extras into OUTDIR, and the log complete
  local rc=$?
  set +e  # pack whatever there is
  [[ -f "$WORK/results.json" ]] && cp "$WORK/results.json" "$OUT/results.json"
  (cd "$WORK" && tar czf "$OUT/extras.tar.gz" --exclude=inductor-cache --exclude=results.json . 2>/dev/null) ||
    echo "could not pack $WORK into $OUT/extras.tar.gz"
  echo "=== $(date -u +%H:%M:%S) done (exit status $rc); $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  exec >&- 2>&-
  # tee ends when nothing holds the log's pipe any more; a leftover child might: 10 s at most.
  for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.2; done
  exit "$rc"
}
trap finish EXIT
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
fail() { echo "FAILED: $*"; status=1; }
# Each timed step's exit status, for the report: 124 is timeout's "cut short by the limit".
timed() {  # timed NAME LIMIT CMD...: CMD under LIMIT seconds (SIGINT, a kill 5 s later)
  local name="$1" limit="$2" rc=0
  shift 2
  timeout --signal=INT --kill-after=5 "$limit" "$@" || rc=$?
  echo "$name $rc" >> "$WORK/steps.txt"
  return "$rc"
}

step "environment"
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: not an NVIDIA GPU machine"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$WORK/nvidia-smi.csv"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'torch sees no GPU'"
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
# nvcc: on PATH, else where toolkits usually are (CMake reads CUDACXX); without one the build
# would quietly leave out the native CUDA kernels.
if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null; then
  SITE="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  for c in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc "$SITE"/nvidia/*/bin/nvcc; do
    if [[ -x "$c" ]]; then export CUDACXX="$c"; break; fi
  done
fi
echo "nvcc: ${CUDACXX:-$(command -v nvcc || echo 'NOT FOUND: the native CUDA kernels will not be built')}"

step "build and install (no downloads; CUDA architecture ${CAP} only)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" CMAKE_GENERATOR=Ninja
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
build_start=$SECONDS
if ! timeout 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
      -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=${CAP}" -v . > "$WORK/build.txt" 2>&1; then
  tail -40 "$WORK/build.txt"
  # A build that failed early (a compile error in the CUDA code): without the native CUDA
  # kernels the Triton half can still run, in the rest of this step's 120 s.
  left=$((120 - (SECONDS - build_start)))
  if (( left < 30 )); then echo "FAILED: build"; exit 1; fi
  fail "build with the native CUDA kernels; building without them ($left s left)"
  if ! timeout "$left" "$PY" -m pip install --no-build-isolation --no-deps --no-index -C cmake.define.AIAAS_FAST_CUDA=OFF \
        -C build-dir=build/gpu-check-no-cuda -v . > "$WORK/build-no-cuda.txt" 2>&1; then
    tail -20 "$WORK/build-no-cuda.txt"; echo "FAILED: build without CUDA kernels too"; exit 1
  fi
  tail -3 "$WORK/build-no-cuda.txt"
else
  tail -3 "$WORK/build.txt"
fi
"$PY" -c "import aiaas_fast, json; print(json.dumps(aiaas_fast.build_info()))" || { echo "FAILED: import"; exit 1; }
# Without the native kernels the Triton tests and benchmarks still run: worth the minutes.
"$PY" -c "import aiaas_fast; assert aiaas_fast.build_info()['cuda']" 2>/dev/null ||
  fail "built without the native CUDA kernels (build.txt says why); going on with Triton"
"$PY" -c "import aiaas_fast; i = aiaas_fast.build_info(); assert not i['cuda'] or i['cutlass']" 2>/dev/null ||
  echo "NOTE: built without CUTLASS's headers: only cuBLASLt and torch.mm products (see the header of this script)"

# Two runs, each with its own results file, so that one cut short keeps the other's. A time
# limit interrupts pytest (SIGINT) so it still reports and writes its results file; the
# kill 5 s later is for a run that hangs. Cheapest first (the Triton kernels compile on first
# use); the engine's and fused MLP's first, as the issue's targets rest on them. Op tests on the
# CUDA backends only, and only the files with CUDA cases: CI covers the CPU.
export AIAAS_FAST_TRITON_AUTOTUNE=0 TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache" AIAAS_FAST_TEST_DEVICES=cuda
export AIAAS_FAST_TEST_INDUCTOR_CACHE="$WORK/inductor-cache"  # new with this run: shared by both pytest runs
# -m gpu: the cases that run on the GPU (the CUDA backends' and the GPU-only files'); the
# CPU-only tests of the same files are CI's.
# A file that fails to import costs its own tests, not the run's (--continue-on-collection-errors).
PYTEST=("$PY" -m pytest -v -rfE --durations=10 -p no:cacheprovider --continue-on-collection-errors -m gpu)
# Worker processes (pytest-xdist, where installed): the Triton kernels' first compiles, one
# after another, alone take some 45 s of the ops run (about 180 kernels); 8 workers spread
# them over the cores. Each worker has its own CUDA context; the GPU has room for all.
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n 8); else echo "NOTE: no pytest-xdist: tests in one process"; fi
step "tests on the GPU: native CUDA kernels, the engine, the fused MLP, many models"
if ! timed tests-gpu 70 "${PYTEST[@]}" --junitxml="$WORK/tests-gpu.xml" \
      tests/test_fused_mlp.py tests/test_engine_cuda.py tests/test_cuda_ops.py tests/test_ensemble_cuda.py; then
  fail "tests (GPU kernels; see log.txt; results still written)"
fi
step "tests on the GPU: every op on every CUDA backend (one autotuning config: many shapes)"
if ! timed tests-ops 90 "${PYTEST[@]}" --junitxml="$WORK/tests-ops.xml" \
      tests/test_adam.py tests/test_backends.py tests/test_mse_loss.py tests/test_linear_relu.py; then
  fail "tests (ops; see log.txt; results still written)"
fi
unset AIAAS_FAST_TRITON_AUTOTUNE AIAAS_FAST_TEST_DEVICES

# Each benchmark writes after every case, cheapest first; its time limit interrupts it (SIGINT)
# so it writes what it measured. Triton's autotuning results are cached between the processes
# (cuda_ops.py times the Triton provider at triton_ops.py's shapes). torch.compile is timed by
# cuda_ops.py alone (at both linear_relu shapes): compiling costs seconds the budget lacks.
step "benchmarks (autotuned, do_bench medians)"
export TRITON_CACHE_AUTOTUNING=1
mkdir -p "$WORK/bench"
if ! timed triton_ops 50 "$PY" benchmarks/triton_ops.py --device cuda --no-compile --out "$WORK/bench"; then
  fail "benchmarks (Triton; what it measured is still written)"
fi
if ! timed cuda-ops 45 "$PY" benchmarks/cuda_ops.py --out "$WORK/bench"; then
  fail "benchmarks (native CUDA; what it measured is still written)"
fi
if ! timed engine 55 "$PY" benchmarks/engine.py --device cuda --no-compile --out "$WORK/bench"; then
  fail "benchmarks (training engine; what it measured is still written)"
fi

step "results.json"
"$PY" scripts/gpu_check_report.py "$WORK" || fail "report"
exit $status
