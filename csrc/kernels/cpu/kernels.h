// CPU kernels: plain C++ on raw pointers, no torch headers. Each works on a range
// (of rows or elements) so the caller decides the threading; each is compiled once
// per instruction set (cmake/CpuKernels.cmake) into its own namespace.
#pragma once
#include <cstdint>

#include "kernels/adam_modes.h"

namespace aiaas_fast::cpu {

// 16-bit float storage, layout-compatible with c10::BFloat16 and c10::Half.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// The type a kernel accumulates and computes in: float for the 16-bit floats.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

// One parameter tensor's view for Adam: every pointer covers the same n elements.
template <typename T>
struct AdamTensor {
  T* param;
  const T* grad;
  T* exp_avg;
  T* exp_avg_sq;
  T* max_exp_avg_sq;  // null unless amsgrad
};

using WeightDecay = kernels::WeightDecay;  // shared with the CUDA kernels

// Scalars for one Adam step, already folded on the host (the kernel does no pow).
template <typename A>
struct AdamScalars {
  A lr, eps, weight_decay;
  A lerp_weight;       // 1 - beta1, folded in double as torch.optim does in Python
  A beta2, one_minus_beta2;
  A decay;             // 1 - lr * weight_decay (decoupled)
  A step_size;         // lr / (1 - beta1^step)
  A bias_corr2_sqrt;   // sqrt(1 - beta2^step)
  A grad_sign;         // -1 when maximizing
  WeightDecay wd_mode;
  bool amsgrad;
};

template <typename T>
struct Kernels {
  using A = acc_t<T>;
  // out[r, :] = relu(out[r, :] + bias) for rows [r0, r1); bias may be null. NaN stays NaN.
  void (*bias_relu)(T* out, const T* bias, int64_t r0, int64_t r1, int64_t cols);
  // gm = g * (out > 0) for rows [r0, r1) (skipped if gm is null); col_sums[c] += sum_r gm[r, c]
  // (skipped if col_sums is null). One pass over g and out for the mask and the bias gradient.
  // The sums are kept in double: a float32 running sum over thousands of rows drifts by
  // hundreds of ulps, where torch's cascade sum stays within a few.
  void (*relu_grad)(const T* g, const T* out, T* gm, double* col_sums, int64_t r0, int64_t r1, int64_t cols);
  // One pass of MSE over n elements: returns sum (x - t)^2 (summed in double, as above);
  // writes grad = (x - t) * grad_scale (2, or 2 / numel for a mean) if grad is not null, and
  // loss = (x - t)^2 elementwise if loss is not null.
  double (*mse)(const T* x, const T* t, T* grad, T* loss, A grad_scale, int64_t n);
  // Adam on elements [i0, i1) of one tensor.
  void (*adam)(const AdamTensor<T>& p, const AdamScalars<A>& s, int64_t i0, int64_t i1);
};

struct KernelSet {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<bf16> bf16_;
  Kernels<f16> f16_;
};

namespace isa_default { const KernelSet& kernel_set(); }
namespace isa_avx2 { const KernelSet& kernel_set(); }
namespace isa_avx512 { const KernelSet& kernel_set(); }

}  // namespace aiaas_fast::cpu
