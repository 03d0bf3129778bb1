#!/usr/bin/env bash
# Compiles every CUDA kernel (csrc/kernels/cuda/*.cu: torch-free) with nvcc for sm_80 and
# sm_90, object files only, and syntax-checks the torch glue (csrc/cuda/*.cpp) against the
# installed torch's headers. Needs no GPU and no CUDA torch: this is CI's build check. The
# CUTLASS GEMMs' SASS must hold tensor-core instructions (cuobjdump: the toolkit's, else
# Triton's bundled one; without either the check is noted and skipped).
# Exit status: 0 all compiled; 1 something failed to compile; 77 no nvcc (nothing checked).
#
#   scripts/check_cuda_kernels.sh            # all of it
#   NVCC=/path/to/nvcc PYTHON=python3 JOBS=2 AIAAS_FAST_CUDA_GENCODE="..." scripts/check_cuda_kernels.sh
#
# CUTLASS headers (for linear_relu_gemm.cu and linear_relu_gemm_sm90.cu): $AIAAS_FAST_CUTLASS_INCLUDE_DIR, else the
# nvidia-cutlass Python package, else build/cutlass-headers/include, else that directory is
# filled from the nvidia-cutlass wheel (pip download --no-deps, about 6 MB). Where none can
# be had, the file is compiled without CUTLASS and the script says "CUTLASS: absent".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
CUTLASS_VERSION=4.2.0.0
GENCODE=${AIAAS_FAST_CUDA_GENCODE:-"-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90"}

NVCC=${NVCC:-$(command -v nvcc || true)}
[[ -n $NVCC && $NVCC != */* ]] && NVCC=$(command -v "$NVCC" || true)  # NVCC=nvcc: a name on PATH
if [[ -z "$NVCC" ]]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do [[ -x "$c" ]] && NVCC=$c && break; done
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "check_cuda_kernels: no nvcc found (set NVCC); nothing checked" >&2
  exit 77
fi
CUDA_INCLUDE=
for d in "$(dirname "$(readlink -f "$NVCC")")/../include" "${CUDA_HOME:-/nonexistent}/include" /usr/local/cuda/include \
         /usr/local/cuda-*/include; do
  if [[ -f "$d/cuda_runtime.h" ]]; then CUDA_INCLUDE=$(cd "$d" && pwd); break; fi
done
echo "nvcc: $NVCC ($("$NVCC" --version | tail -1))"

OUT=$ROOT/build/cuda-check
mkdir -p "$OUT"

# ---- CUTLASS headers
find_cutlass() {
  local d
  for d in "${AIAAS_FAST_CUTLASS_INCLUDE_DIR:-}" \
           "$("$PYTHON" -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include') if s else '')" 2>/dev/null)" \
           "$ROOT/build/cutlass-headers/include"; do
    if [[ -n "$d" && -f "$d/cutlass/gemm/device/gemm.h" ]]; then echo "$d"; return 0; fi
  done
  return 1
}
CUTLASS=$(find_cutlass)
if [[ -z "$CUTLASS" ]]; then
  echo "CUTLASS headers not found: fetching nvidia-cutlass==$CUTLASS_VERSION (headers only)"
  rm -rf "$OUT/cutlass-wheel"
  if "$PYTHON" -m pip download --quiet --no-deps "nvidia-cutlass==$CUTLASS_VERSION" -d "$OUT/cutlass-wheel" >&2; then
    "$PYTHON" - "$OUT/cutlass-wheel" "$ROOT/build/cutlass-headers" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = os.path.join(sys.argv[2], "include", name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as dst:
                dst.write(src.read())
PY
  fi
  CUTLASS=$(find_cutlass)
fi
if [[ -n "$CUTLASS" ]]; then
  echo "CUTLASS: $CUTLASS"
  CUTLASS_FLAGS="-DAIAAS_FAST_HAVE_CUTLASS=1 -isystem $CUTLASS"
else
  echo "CUTLASS: absent (linear_relu_gemm.cu compiled without it)"
  CUTLASS_FLAGS="-DAIAAS_FAST_HAVE_CUTLASS=0"
fi

# ---- the kernels: nvcc, the architectures the library is built for; the Hopper GEMM
# (*_sm90.cu) for sm_90a alone, as cmake/CudaKernels.cmake builds it
compile_kernel() {
  local src=$1 obj log flags=$GENCODE
  obj=$OUT/$(basename "$src" .cu).o
  log=$OUT/$(basename "$src" .cu).log
  if [[ $src == *_sm90.cu ]]; then
    if [[ $CUTLASS_FLAGS == *HAVE_CUTLASS=1* ]]; then
      flags="-DAIAAS_FAST_HAVE_CUTLASS_SM90=1 -DNDEBUG -gencode arch=compute_90a,code=sm_90a"
    else
      flags="-DAIAAS_FAST_HAVE_CUTLASS_SM90=0 $GENCODE"
    fi
  fi
  local start=$SECONDS
  # shellcheck disable=SC2086
  if "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -I "$ROOT/csrc" $CUTLASS_FLAGS $flags \
      -c "$src" -o "$obj" >"$log" 2>&1; then
    # ptxas reports a serialized wgmma pipeline as information, not a warning: a Hopper GEMM
    # that would run far below its speed. Fail on it here.
    if grep -q "C7510" "$log"; then
      echo "FAIL  $src: wgmma serialized (ptxas C7510)"; cat "$log"; return 1
    fi
    check_tensor_cores "$src" "$obj" || return 1
    echo "ok    $src ($((SECONDS - start)) s)"
  else
    echo "FAIL  $src"; cat "$log"; return 1
  fi
}

# ---- the CUTLASS GEMMs must run on tensor cores: every cubin of the 2.x kernel holds mma.sync
# (SASS HMMA), the Hopper one wgmma fed by TMA (HGMMA, UTMALDG). A configuration that fell
# back to SIMT math would compile, and be found only on a GPU, many times slower.
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
if [[ -z $CUOBJDUMP ]]; then
  for c in "$(dirname "$NVCC")/cuobjdump" \
           "$("$PYTHON" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null)"; do
    [[ -x $c ]] && CUOBJDUMP=$c && break
  done
fi
check_tensor_cores() {
  local src=$1 obj=$2 want missing
  [[ $CUTLASS_FLAGS == *HAVE_CUTLASS=1* ]] || return 0
  case $src in
    *linear_relu_gemm_sm90.cu) want="HGMMA UTMALDG" ;;
    *linear_relu_gemm.cu) want="HMMA" ;;
    *) return 0 ;;
  esac
  if [[ -z $CUOBJDUMP ]]; then echo "note  $src: no cuobjdump, tensor-core instructions not checked"; return 0; fi
  # each architecture's SASS ("arch = sm_XX" starts it) must hold every wanted instruction
  missing=$("$CUOBJDUMP" -sass "$obj" | awk -v want="$want" '
    /^arch = / { arch = $3; archs[arch] = 1 }
    { n = split(want, w, " "); for (i = 1; i <= n; i++) if (index($0, w[i])) seen[arch, w[i]] = 1 }
    END { any = 0; for (a in archs) { any = 1; n = split(want, w, " "); for (i = 1; i <= n; i++) if (!((a, w[i]) in seen)) print a ": no " w[i] }
          if (!any) print "no SASS at all" }')
  if [[ -n $missing ]]; then
    echo "FAIL  $src: not on tensor cores ($(tr '\n' ';' <<<"$missing"))"; return 1
  fi
}

# ---- the glue: host C++ against torch's headers (a CPU torch wheel ships c10/cuda and
# ATen/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h: a stub stands in)
TORCH_INCLUDE=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null)
if [[ -n "$TORCH_INCLUDE" && -f "$TORCH_INCLUDE/c10/cuda/CUDAGuard.h" ]]; then
  mkdir -p "$OUT/stub/c10/cuda/impl"
  [[ -f "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]] ||
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  GLUE=1
else
  echo "glue: torch's c10/cuda headers are not installed; csrc/cuda/*.cpp not checked"
  GLUE=0
fi
CXX=${CXX:-c++}
# The standard torch's headers need (ATen.h says: 17 up to torch 2.13, 20 from 2.14), as CMakeLists.txt picks it.
CXX_STD=17
[[ $GLUE == 1 ]] && grep -q 202002L "$TORCH_INCLUDE/ATen/ATen.h" 2>/dev/null && CXX_STD=20
check_glue() {
  local src=$1 log start=$SECONDS
  log=$OUT/$(basename "$src" .cpp).glue.log
  if "$CXX" -std=c++$CXX_STD -fsyntax-only -Wall -Wextra -Wno-unused-parameter -I "$ROOT/csrc" \
      -isystem "$TORCH_INCLUDE" -isystem "$TORCH_INCLUDE/torch/csrc/api/include" -isystem "$OUT/stub" \
      -isystem "$CUDA_INCLUDE" "$src" >"$log" 2>&1; then
    echo "ok    $src (syntax, $((SECONDS - start)) s)"
  else
    echo "FAIL  $src"; cat "$log"; return 1
  fi
}

export -f compile_kernel check_glue check_tensor_cores
export NVCC ROOT OUT CUTLASS_FLAGS GENCODE CXX CXX_STD TORCH_INCLUDE CUDA_INCLUDE CUOBJDUMP
start=$SECONDS
{
  for f in csrc/kernels/cuda/*.cu; do echo "compile_kernel $f"; done
  if [[ $GLUE == 1 ]]; then for f in csrc/cuda/*.cpp; do echo "check_glue $f"; done; fi
} | xargs -P "$JOBS" -I{} bash -c '{}'
status=$?
echo "check_cuda_kernels: $([[ $status == 0 ]] && echo passed || echo FAILED) in $((SECONDS - start)) s"
[[ $status == 0 ]] || exit 1
