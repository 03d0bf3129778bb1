// CUDA kernels: plain CUDA C++ on raw device pointers, sizes, strides and a stream; no
// torch headers, so CI compiles every one of them with nvcc on a machine with no GPU and a
// CPU-only torch (scripts/check_cuda_kernels.sh). The torch glue (checks, allocation,
// device guard, current stream, dispatcher registration) lives in csrc/cuda/.
// Every launcher returns the cudaError_t of its launch (cudaGetLastError right after it),
// cudaErrorNotSupported where it cannot take the arguments (the glue then falls back).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/adam_modes.h"

namespace aiaas_fast::cuda {

// The element types, as the glue maps them from at::ScalarType.
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// ---- linear_relu

// Whether this build holds the CUTLASS GEMM (compiled only where CUTLASS's headers were found).
bool have_cutlass_gemm();
// out[M, N] = relu(x[M, K] @ w[N, K]^T + bias[N]) in one CUTLASS 2.x tensor-core GEMM
// (sm_80 kernels, which run on sm_80 and sm_90), the bias added and the ReLU applied in
// its epilogue. bf16 and f16 only; x and w row-major with unit stride along K (leading
// dimensions ldx, ldw), out row-major contiguous (ld = N), bias contiguous, not null.
// Needs K and N multiples of 8 and 16-byte aligned pointers and leading dimensions;
// returns cudaErrorNotSupported otherwise (or without CUTLASS, or for f32/f64).
cudaError_t linear_relu_gemm(DType dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx,
                             const void* w, int64_t ldw, const void* bias, void* out, cudaStream_t stream);

// Whether this build holds the Hopper GEMM (built for sm_90a where the build includes
// architecture 90 and CUTLASS's headers were found).
bool have_cutlass_sm90_gemm();
// The same product as linear_relu_gemm, with the same requirements, as a CUTLASS 3.x kernel
// for compute capability 9.0 only (wgmma, TMA, warp-specialized and persistent).
cudaError_t linear_relu_gemm_sm90(DType dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx,
                                  const void* w, int64_t ldw, const void* bias, void* out, cudaStream_t stream);

// Why the last CUTLASS GEMM above to fail on this thread failed, when CUTLASS itself refused
// (the GEMM returned cudaErrorUnknown with no CUDA error behind it): CUTLASS's status text.
const char* cutlass_failure();

// out[r, c] = relu(out[r, c] + bias[c]) over a contiguous rows x cols matrix, in place;
// bias may be null. NaN stays NaN, as torch.relu. The epilogue of the fallback path,
// after a plain matrix product.
cudaError_t bias_relu(DType dtype, void* out, const void* bias, int64_t rows, int64_t cols, cudaStream_t stream);

// The ReLU backward's one pass over (g, out), both contiguous rows x cols:
//   gm = g * (out > 0)            (if gm is not null; NaN outputs pass the gradient, as
//                                  threshold_backward)
//   grad_bias[c] = sum_r gm[r, c] (if grad_bias is not null)
// The bias gradient is summed in double, in two fixed stages (blocks of rows into
// `workspace`, then the blocks in order), so its bits do not depend on the GPU or on timing.
size_t relu_grad_workspace_bytes(DType dtype, int64_t rows, int64_t cols);
cudaError_t relu_grad(DType dtype, const void* g, const void* out, void* gm, void* grad_bias, void* workspace,
                      int64_t rows, int64_t cols, cudaStream_t stream);

// ---- mse_loss

enum class Reduction : int { none = 0, mean = 1, sum = 2 };

// One pass over n contiguous elements of x and t, with 16-byte vector loads where every
// pointer is 16-byte aligned:
//   grad[i] = (x - t) * grad_scale      (if grad is not null; grad_scale 2, or 2 / n for a mean)
//   loss[i] = (x - t)^2                 (reduction none)
//   loss[0] = sum (x - t)^2 [/ n]       (mean or sum: a one-element output in x's dtype)
// The sum is deterministic: per-block partial sums (a grid that depends on n only) written to
// `workspace`, then a second kernel adds them in a fixed order, in double.
size_t mse_loss_workspace_bytes(int64_t n);
cudaError_t mse_loss(DType dtype, const void* x, const void* t, void* grad, void* loss, void* workspace,
                     double grad_scale, Reduction reduction, int64_t n, cudaStream_t stream);

// ---- Adam (multi-tensor apply)

using WeightDecay = kernels::WeightDecay;  // shared with the CPU kernels

// One parameter tensor: every pointer covers the same n contiguous elements. param and grad
// have the parameter dtype; the state (exp_avg, exp_avg_sq, max_exp_avg_sq) has the state
// dtype (the parameter dtype, or float32 for 16-bit parameters).
struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;   // null unless amsgrad
  int64_t n;
  // The step: a device scalar (float or double), incremented by the launch; or, when both
  // are null, host_step, already incremented by the caller.
  float* step_f32;
  double* step_f64;
  double host_step;
};

struct AdamOptions {
  double lr, beta1, beta2, weight_decay, eps;
  WeightDecay wd_mode;
  bool amsgrad, maximize;
};

// Updates every tensor in place in as few launches as the kernel-argument table allows
// (one per kAdamMaxTensors tensors or kAdamMaxBlocks chunks), after one launch that
// increments the device steps. Nothing here synchronizes or reads device memory on the
// host, so the whole update can be captured in a CUDA graph (with device steps).
constexpr int kAdamMaxTensors = 32;
constexpr int kAdamMaxBlocks = 320;
cudaError_t adam(DType param_dtype, DType state_dtype, const AdamTensor* tensors, int64_t count,
                 const AdamOptions& options, cudaStream_t stream);

}  // namespace aiaas_fast::cuda
