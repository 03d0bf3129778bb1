#!/usr/bin/env bash
# The whole build against a CUDA build of torch, on a machine with nvcc but no GPU: what CI's
# compile check (check_cuda_kernels.sh: object files, the glue syntax-checked against a CPU
# torch) leaves out. CMake's CUDA set-up through torch's own config, the glue compiled for
# real, the link against libtorch_cuda, an import that resolves every symbol, the installed
# CMake package used by a consumer; then, where it may hide the toolkit (root and unshare),
# the CPU-only build a CUDA torch gets on a machine without nvcc.
#
#   scripts/check_cuda_torch_build.sh            # a venv in $VENV (default /tmp/aiaas-fast-cuda-venv)
#   TORCH="torch==2.14.1" ARCHS=90 VENV=... scripts/check_cuda_torch_build.sh
#   TORCH=/tmp/torch-2.11.0-cp312-...whl PYTHON=python3.12 VENV=... scripts/check_cuda_torch_build.sh
#                                                 # the GPU machine's stack (torch 2.11, Python 3.12)
#
# Needs a CUDA wheel of torch that pip can install (about 5.5 GB in the venv; this project's
# CI machine has torch 2.14.1+cu130 on its local disk) and about 10 minutes on 2 cores.
# Not part of CI: too big. Exit status 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-/tmp/aiaas-fast-cuda-venv}
TORCH=${TORCH:-torch==2.14.1}
ARCHS=${ARCHS:-90}
BUILD=${BUILD:-/tmp/aiaas-fast-cuda-build}
LOG=${LOG:-/tmp/aiaas-fast-cuda-build.log}
status=0
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
fail() { echo "FAILED: $*"; status=1; }

step "venv $VENV with $TORCH (a CUDA build) and the build requirements"
[[ -x $VENV/bin/python ]] || "${PYTHON:-python3}" -m venv "$VENV" || { echo "FAILED: venv"; exit 1; }
PY=$VENV/bin/python
"$PY" -m pip install -q "$TORCH" -r requirements-build.txt pytest tqdm || { echo "FAILED: pip install"; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); assert torch.version.cuda, 'not a CUDA build of torch'" ||
  { echo "FAILED: $TORCH is not a CUDA build"; exit 1; }

step "build with CUDA (architectures $ARCHS, fresh build tree $BUILD; log $LOG)"
rm -rf "$BUILD"
if CMAKE_GENERATOR=Ninja "$PY" -m pip install --no-build-isolation --no-deps -v \
    -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCHS" -C "build-dir=$BUILD" . >"$LOG" 2>&1; then
  grep -E "aiaas_fast:|CUDA compiler identification" "$LOG" | sed 's/^ *//'
  "$PY" - <<'PY' || fail "import or build_info"
import json, aiaas_fast
info = aiaas_fast.build_info()
print(json.dumps(info))
assert info["cuda"] and info["cuda_archs"], "built without CUDA"
PY
  LIB=$("$PY" -c "import aiaas_fast, os; d = os.path.join(os.path.dirname(aiaas_fast.__file__), 'lib'); print(os.path.join(d, os.listdir(d)[0]))")
  TORCH_LIB=$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  NV_LIBS=$(find "$VENV" -path '*/nvidia/*/lib' -type d | paste -sd:)
  if LD_LIBRARY_PATH="$TORCH_LIB:$NV_LIBS" ldd -r "$LIB" 2>&1 | grep -E "undefined symbol|not found"; then
    fail "unresolved symbols in $LIB"
  else
    echo "ok    every symbol of $(basename "$LIB") resolves"
  fi
  step "the package's build tests against this torch"
  (cd "$ROOT" && "$PY" -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_cpp_consumer.py tests/test_cuda_build.py) ||
    fail "tests"
else
  tail -40 "$LOG"; fail "build with CUDA"
fi

step "CPU-only build where the CUDA toolkit is hidden (as on a machine without nvcc)"
NVCC=$(command -v nvcc || true)
# nvcc's dry run names its real directory (TOP), also when $NVCC is a wrapper script.
TOOLKIT=
if [[ -n $NVCC ]]; then
  echo > "$BUILD-probe.cu"
  TOOLKIT=$("$NVCC" --dryrun -c "$BUILD-probe.cu" -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [[ -n $TOOLKIT ]] && TOOLKIT=$(readlink -f "$TOOLKIT")
fi
if [[ $(id -u) != 0 ]] || ! command -v unshare >/dev/null || [[ -z $TOOLKIT ]]; then
  echo "skipped: needs root, unshare and a toolkit to hide"
else
  mkdir -p "$BUILD-empty"
  # shellcheck disable=SC2016
  if unshare -m bash -c '
      mount --bind "$1" "$2" && mount --bind /dev/null "$3" || exit 3
      command -v nvcc >/dev/null && "$(command -v nvcc)" --version >/dev/null 2>&1 && { echo "the toolkit is still visible"; exit 3; }
      rm -rf "$4-cpu"
      CMAKE_GENERATOR=Ninja "$5" -m pip install --no-build-isolation --no-deps -v -C "build-dir=$4-cpu" . >"$6.cpu" 2>&1 || { tail -30 "$6.cpu"; exit 1; }
      grep "aiaas_fast:" "$6.cpu" | sed "s/^ *//"
      "$5" -c "import aiaas_fast; assert not aiaas_fast.build_info()[\"cuda\"]; print(\"ok    CPU-only build imports\")" || exit 1
      "$5" -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_cpp_consumer.py || exit 1
    ' _ "$BUILD-empty" "$TOOLKIT" "$NVCC" "$BUILD" "$PY" "$LOG"; then
    :
  else
    fail "CPU-only build without a toolkit"
  fi
fi
echo
echo "check_cuda_torch_build: $([[ $status == 0 ]] && echo passed || echo FAILED)"
exit $status
