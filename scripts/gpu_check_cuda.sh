#!/usr/bin/env bash
# The native CUDA backend on a GPU machine: build with CUDA (sm_90 only, to save time, unless
# AIAAS_FAST_CUDA_ARCHS says otherwise), run the op test suite on the GPU (tests/test_cuda_ops.py,
# with the CPU op suite alongside), then the CUDA benchmark, whose results land in
# benchmarks/results/ (or $OUT/results when $OUT is set, as on the device runner).
# Not part of scripts/gpu_check.sh (which covers the native backend within its 8 minutes): an
# unhurried check of the native backend alone, without time limits, the CPU op tests alongside,
# for a GPU session with time to spare.
#
# CUTLASS headers: set AIAAS_FAST_CUTLASS_INCLUDE_DIR, or have nvidia-cutlass installed, or a
# build/cutlass-headers/include left by scripts/check_cuda_kernels.sh (carry it to the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export AIAAS_FAST_CUDA_ARCHS=${AIAAS_FAST_CUDA_ARCHS:-90}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PYTHON" -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -5
"$PYTHON" -c "import aiaas_fast, json; print(json.dumps(aiaas_fast.build_info(), indent=1))"
status=0
"$PYTHON" -m pytest -q -x tests/test_cuda_ops.py || status=1
"$PYTHON" -m pytest -q tests/test_linear_relu.py tests/test_mse_loss.py tests/test_adam.py || status=1
RESULTS=${OUT:+$OUT/results}
"$PYTHON" benchmarks/cuda_ops.py ${RESULTS:+--out "$RESULTS"} || status=1
exit $status
