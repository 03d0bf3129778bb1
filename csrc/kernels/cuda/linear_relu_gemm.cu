// linear_relu's forward as one CUTLASS 2.x tensor-core GEMM with the bias and the ReLU in
// its epilogue: out = relu(x @ w^T + bias), with the bias read as a C matrix of row stride
// 0 (NoBetaScaling: D = act(alpha * acc + C)), so it costs no pass and no extra memory.
//
// Why CUTLASS 2.x (cutlass::gemm::device::Gemm, sm_80 mma.sync kernels) and not a CUTLASS
// 3.x / CuTe wgmma kernel: it was written without a GPU to run it on, and the 2.x device
// API is the one that compiles and launches reliably; its sm_80 kernels also run on sm_90
// (compiled to sm_90 SASS as well), but without wgmma/TMA they are not expected to reach
// cuBLAS on an H100/H200. The glue (csrc/cuda/linear_relu.cpp) therefore picks between this
// and cuBLASLt's RELU_BIAS epilogue (the fused path inside torch._addmm_activation) with
// AIAAS_FAST_CUDA_GEMM; the benchmark (benchmarks/cuda_ops.py) measures both.
//
// Compiled with CUTLASS only where its headers were found (AIAAS_FAST_HAVE_CUTLASS=1).
#include "kernels/cuda/common.cuh"

#if AIAAS_FAST_HAVE_CUTLASS
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/epilogue/thread/linear_combination_generic.h>
#include <cutlass/gemm/device/gemm.h>
#endif

namespace aiaas_fast::cuda {

// Shared by both CUTLASS GEMMs (this file is always compiled, the Hopper one not everywhere).
namespace {
thread_local const char* cutlass_failure_reason = "";
}

const char* cutlass_failure() { return cutlass_failure_reason; }

void detail::cutlass_clear_failure() { cutlass_failure_reason = ""; }

cudaError_t detail::cutlass_failed(const char* reason, bool internal) {
  const cudaError_t err = cudaGetLastError();
  // CUTLASS's kErrorInternal is a kernel launch or cudaFuncSetAttribute that failed: it read
  // (and so cleared) the CUDA error itself, which is then lost here.
  if (internal)
    reason = "Error Internal (a kernel launch or cudaFuncSetAttribute failed inside CUTLASS, which read and so "
             "cleared the CUDA error; compute-sanitizer reports the failing call)";
  cutlass_failure_reason = err == cudaSuccess && reason ? reason : "";
  return err != cudaSuccess ? err : cudaErrorUnknown;
}

#if AIAAS_FAST_HAVE_CUTLASS
namespace {

// A is x (M x K, row-major), B is w^T (K x N, column-major: w is N x K row-major), C is the
// bias broadcast over rows (row-major, stride 0), D is out (M x N, row-major).
template <typename Element>
using GemmBiasRelu = cutlass::gemm::device::Gemm<
    Element, cutlass::layout::RowMajor,                     // A: x
    Element, cutlass::layout::ColumnMajor,                  // B: w^T
    Element, cutlass::layout::RowMajor,                     // C (bias) and D (out)
    float,                                                  // accumulator
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 32>,                 // threadblock tile
    cutlass::gemm::GemmShape<64, 64, 32>,                   // warp tile: 4 warps
    cutlass::gemm::GemmShape<16, 8, 16>,                    // mma.sync.m16n8k16
    // ReLu here propagates NaN (maximum<T, PropagateNaN=true>), as torch.relu does.
    cutlass::epilogue::thread::LinearCombinationGeneric<
        cutlass::epilogue::thread::ReLu, Element, 128 / cutlass::sizeof_bits<Element>::value, float, float,
        cutlass::epilogue::thread::ScaleType::NoBetaScaling>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>,
    4>;  // pipeline stages: 4 x (128 + 128) x 32 x 2 bytes = 64 KiB of shared memory

template <typename Element>
cudaError_t run_gemm(int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx, const void* w, int64_t ldw,
                     const void* bias, void* out, cudaStream_t stream) {
  using Gemm = GemmBiasRelu<Element>;
  constexpr int64_t kMaxInt = 0x7fffffff;
  if (M > kMaxInt || N > kMaxInt || K > kMaxInt || ldx > kMaxInt || ldw > kMaxInt) return cudaErrorNotSupported;
  const cutlass::gemm::GemmCoord problem{int(M), int(N), int(K)};
  auto* xp = static_cast<const Element*>(x);
  auto* wp = static_cast<const Element*>(w);
  auto* bp = static_cast<const Element*>(bias);
  auto* op = static_cast<Element*>(out);
  typename Gemm::Arguments args(problem,
                                {xp, cutlass::layout::RowMajor(int(ldx))},
                                {wp, cutlass::layout::ColumnMajor(int(ldw))},
                                {bp, cutlass::layout::RowMajor(0)},  // the bias: every row reads row 0
                                {op, cutlass::layout::RowMajor(int(N))},
                                {1.0f, 0.0f});
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  // split_k_slices = 1: no workspace. initialize() opts into > 48 KiB of dynamic shared memory.
  cutlass::Status status = gemm.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) return detail::cutlass_failed(cutlass::cutlassGetStatusString(status), status == cutlass::Status::kErrorInternal);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return detail::cutlass_failed(cutlass::cutlassGetStatusString(status), status == cutlass::Status::kErrorInternal);
  return cudaGetLastError();
}

}  // namespace

bool have_cutlass_gemm() { return true; }

cudaError_t linear_relu_gemm(DType dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx,
                             const void* w, int64_t ldw, const void* bias, void* out, cudaStream_t stream) {
  detail::cutlass_clear_failure();
  if (M == 0 || N == 0) return cudaSuccess;
  if (!detail::gemm_bias_relu_takes(dtype, N, K, x, ldx, w, ldw, bias, out)) return cudaErrorNotSupported;
  switch (dtype) {
    case DType::bf16: return run_gemm<cutlass::bfloat16_t>(M, N, K, x, ldx, w, ldw, bias, out, stream);
    case DType::f16: return run_gemm<cutlass::half_t>(M, N, K, x, ldx, w, ldw, bias, out, stream);
    default: return cudaErrorNotSupported;
  }
}

#else  // no CUTLASS headers at build time: the glue falls back to cuBLASLt / a plain product

bool have_cutlass_gemm() { return false; }

cudaError_t linear_relu_gemm(DType, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t,
                             const void*, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif

}  // namespace aiaas_fast::cuda
