// Device helpers shared by the kernel files: element types, loads that widen to the
// accumulation type, stores that round once, and launch-error plumbing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/kernels.cuh"

namespace aiaas_fast::cuda::detail {

// The type a kernel accumulates and computes in: float for the 16-bit floats.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
// Round to nearest even, as c10::BFloat16 and c10::Half do.
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// A state element converts from the accumulation type like a parameter does.
template <typename T, typename A> __device__ __forceinline__ T store_as(A v) { return from_acc<T>(static_cast<acc_t<T>>(v)); }

// N elements of T moved as one aligned access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// What both CUTLASS bias+ReLU GEMMs take (linear_relu_gemm*.cu): 16-bit floats, K and N and
// the leading dimensions multiples of 8, 16-byte aligned pointers (128-bit accesses, TMA rows),
// a bias. Anything else is declined (cudaErrorNotSupported) and the glue falls back.
inline bool gemm_bias_relu_takes(DType dtype, int64_t N, int64_t K, const void* x, int64_t ldx, const void* w,
                                 int64_t ldw, const void* bias, const void* out) {
  return (dtype == DType::bf16 || dtype == DType::f16) && K > 0 && K % 8 == 0 && N % 8 == 0 && ldx % 8 == 0 &&
         ldw % 8 == 0 && bias != nullptr && aligned(x, 16) && aligned(w, 16) && aligned(bias, 16) && aligned(out, 16);
}

// A CUTLASS call that did not succeed: the CUDA error behind it where there is one, else
// cudaErrorUnknown, with CUTLASS's reason kept for cutlass_failure() (kernels.cuh); `internal`:
// CUTLASS's status was kErrorInternal, a failed launch whose CUDA error CUTLASS cleared.
cudaError_t cutlass_failed(const char* reason, bool internal);
// Forgets the last reason: each CUTLASS GEMM calls it first, so a reason is never a stale one.
void cutlass_clear_failure();

// Calls f with a null pointer of the element type that dtype names.
template <typename F> cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(static_cast<float*>(nullptr));
    case DType::f64: return f(static_cast<double*>(nullptr));
    case DType::bf16: return f(static_cast<__nv_bfloat16*>(nullptr));
    case DType::f16: return f(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace aiaas_fast::cuda::detail
