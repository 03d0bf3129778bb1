// What the CUDA glue files share: the dtype mapping to the torch-free kernels, the launch
// check, and the choice of GEMM for linear_relu's forward.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "kernels/cuda/kernels.cuh"

namespace aiaas_fast::cuda_glue {

inline cuda::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::f32;
    case at::kDouble: return cuda::DType::f64;
    case at::kBFloat16: return cuda::DType::bf16;
    case at::kHalf: return cuda::DType::f16;
    default: TORCH_CHECK(false, op, ": no CUDA kernel for dtype ", t.scalar_type());
  }
}

// Which product linear_relu's forward uses on CUDA (AIAAS_FAST_CUDA_GEMM):
//   auto      (default) CUTLASS for bfloat16/float16 on sm_80..sm_89, cuBLASLt's RELU_BIAS
//             epilogue elsewhere (sm_90: cuBLAS's own wgmma kernels, until benchmarks/
//             results/ show the CUTLASS 3.x kernel ahead)
//   cutlass   a CUTLASS kernel wherever it takes the arguments: the 3.x wgmma kernel on
//             compute capability 9.0 (where built for sm_90a), else the 2.x kernel
//   cublaslt  cuBLASLt's RELU_BIAS epilogue (through at::_addmm_activation)
//   mm        a plain product, then this library's bias+ReLU kernel
enum class Gemm { automatic, cutlass, cublaslt, mm };
Gemm gemm_choice();
const char* gemm_name(Gemm g);
// The compute capability major of a device, cached.
int cc_major(int device);

}  // namespace aiaas_fast::cuda_glue
