// Counts of the products linear_relu's CUDA forward ran, by name: the CUDA glue records each
// one; aiaas_fast::cuda_gemm_counts() (aiaas_fast.h) reads them.
#pragma once

namespace aiaas_fast::detail {

// name: "cutlass_sm90", "cutlass_sm80", "cublaslt" or "mm" (a static string).
void count_cuda_gemm(const char* name);

}  // namespace aiaas_fast::detail
