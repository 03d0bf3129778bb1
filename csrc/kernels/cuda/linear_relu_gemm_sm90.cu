// linear_relu's forward on Hopper as one CUTLASS 3.x GEMM: out = relu(x @ w^T + bias), with
// wgmma tensor-core instructions fed by TMA loads in a warp-specialized, persistent kernel,
// and the bias and ReLU in its epilogue (an epilogue visitor: per-column bias, then ReLU,
// applied to the accumulators before the tile is stored; no C matrix is read).
//
// Built for sm_90a only (wgmma and setmaxnreg exist on no other target), in its own object
// library (cmake/CudaKernels.cmake), and only where the build includes architecture 90 and
// CUTLASS's headers were found; elsewhere this file compiles to the stubs at the bottom.
// The glue (csrc/cuda/linear_relu.cpp) calls it on compute capability 9.0 devices when
// AIAAS_FAST_CUDA_GEMM picks CUTLASS; benchmarks/cuda_ops.py measures it against cuBLASLt.
#include "kernels/cuda/common.cuh"

#if AIAAS_FAST_HAVE_CUTLASS_SM90
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#endif

namespace aiaas_fast::cuda {

#if AIAAS_FAST_HAVE_CUTLASS_SM90
namespace {

using namespace cute;

// A is x (M x K, K contiguous), B is w (N x K, K contiguous: "column-major K x N" in CUTLASS's
// terms), D is out (M x N, row-major). Both operands K-major: the layout wgmma reads from
// shared memory without a transpose.
template <typename Element>
struct Sm90GemmBiasRelu {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _2, _1>;  // two CTAs along N share A's tiles through TMA multicast
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<
      cutlass::epilogue::thread::ReLu, Element, float, Element, Element, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignment,      // no C: the epilogue adds the bias only
      Element, cutlass::layout::RowMajor, kAlignment,   // D
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,
      Element, cutlass::layout::ColumnMajor, kAlignment,
      float, TileShape, ClusterShape,
      // As many pipeline stages as the shared memory holds beside the epilogue's.
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

cudaError_t status_error(cutlass::Status s) {
  return s == cutlass::Status::kSuccess ? cudaSuccess : detail::cutlass_failed(cutlass::cutlassGetStatusString(s), s == cutlass::Status::kErrorInternal);
}

template <typename Element>
cudaError_t run_gemm(int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx, const void* w, int64_t ldw,
                     const void* bias, void* out, cudaStream_t stream) {
  using Gemm = typename Sm90GemmBiasRelu<Element>::Gemm;
  using Kernel = typename Gemm::GemmKernel;
  constexpr int64_t kMaxInt = 0x7fffffff;
  if (M > kMaxInt || N > kMaxInt || K > kMaxInt) return cudaErrorNotSupported;
  // Strides (row, column, batch) in elements; the unit strides are compile-time.
  typename Kernel::StrideA stride_x = make_stride(ldx, Int<1>{}, int64_t(0));
  typename Kernel::StrideB stride_w = make_stride(ldw, Int<1>{}, int64_t(0));
  typename Kernel::StrideD stride_out = make_stride(N, Int<1>{}, int64_t(0));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {int(M), int(N), int(K), 1},
      {static_cast<const Element*>(x), stride_x, static_cast<const Element*>(w), stride_w},
      {{}, nullptr, stride_out, static_cast<Element*>(out), stride_out}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<const Element*>(bias);

  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  // The persistent tile scheduler needs no workspace for a plain GEMM; should a CUTLASS
  // version want one, decline and let the glue take cuBLASLt rather than allocate here.
  if (Gemm::get_workspace_size(args) != 0) return cudaErrorNotSupported;
  cudaError_t err = status_error(gemm.initialize(args, nullptr, stream));
  if (err != cudaSuccess) return err;
  err = status_error(gemm.run(stream));
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace

bool have_cutlass_sm90_gemm() { return true; }

cudaError_t linear_relu_gemm_sm90(DType dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx,
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

#else  // not built for sm_90a with CUTLASS: the glue uses the CUTLASS 2.x kernel or cuBLASLt

bool have_cutlass_sm90_gemm() { return false; }

cudaError_t linear_relu_gemm_sm90(DType, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t,
                                  const void*, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}

#endif

}  // namespace aiaas_fast::cuda
