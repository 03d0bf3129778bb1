// The CPU kernels, written as plain loops over contiguous memory that the compiler
// vectorizes for the instruction set this copy is built for (AIAAS_FAST_ISA). Every
// loop computes in acc_t<T> (float for the 16-bit types) and rounds once on store.
#include "kernels/cpu/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#define AIAAS_CAT_(a, b) a##b
#define AIAAS_CAT(a, b) AIAAS_CAT_(a, b)
#define AIAAS_STR_(a) #a
#define AIAAS_STR(a) AIAAS_STR_(a)

namespace aiaas_fast::cpu::AIAAS_CAT(isa_, AIAAS_FAST_ISA) {
namespace {

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline float load(const bf16* p) {
  uint32_t u = uint32_t(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float load(const f16* p) {
  _Float16 h;
  std::memcpy(&h, p, sizeof h);
  return float(h);
}

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(bf16* p, float v) {
  // Round to nearest even, as c10::BFloat16 does; NaN becomes the canonical quiet NaN.
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  p->bits = (v != v) ? uint16_t(0x7FC0) : rounded;
}
inline void store(f16* p, float v) {
  _Float16 h = static_cast<_Float16>(v);
  std::memcpy(p, &h, sizeof h);
}

// Lanes of independent partial sums: a reduction the compiler can vectorize without
// -ffast-math, and one whose order (hence its bits) does not depend on threads.
template <typename A> constexpr int kLanes = 64 / sizeof(A);

template <typename T>
void bias_relu(T* __restrict out, const T* __restrict bias, int64_t r0, int64_t r1, int64_t cols) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict row = out + r * cols;
    if (bias) {
      for (int64_t c = 0; c < cols; ++c) {
        A v = load(row + c) + load(bias + c);
        store(row + c, v < A(0) ? A(0) : v);  // written so that NaN passes through, as torch.relu
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        A v = load(row + c);
        store(row + c, v < A(0) ? A(0) : v);
      }
    }
  }
}

// S: the column sums' type (A, or double where there is no room for A's chunk sums).
template <typename T, bool kWriteGrad, bool kSumCols, typename S>
void relu_grad_rows(const T* __restrict g, const T* __restrict out, T* __restrict gm, S* __restrict col_sums,
                    int64_t r0, int64_t r1, int64_t cols) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict grow = g + r * cols;
    const T* __restrict orow = out + r * cols;
    T* __restrict mrow = kWriteGrad ? gm + r * cols : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      // threshold_backward's rule: zero where out <= 0, so NaN outputs pass the gradient.
      A v = load(orow + c) <= A(0) ? A(0) : load(grow + c);
      if constexpr (kWriteGrad) store(mrow + c, v);
      if constexpr (kSumCols) col_sums[c] += static_cast<S>(v);
    }
  }
}

// The column sums run in A over chunks of 64 rows (the loop as fast as without sums in
// double), each chunk then added into col_sums in double; past 1024 columns (no room on
// the stack) straight in double, where the pass is bound by memory anyway.
template <typename T, bool kWriteGrad, bool kSumCols>
void relu_grad_impl(const T* __restrict g, const T* __restrict out, T* __restrict gm,
                    double* __restrict col_sums, int64_t r0, int64_t r1, int64_t cols) {
  using A = acc_t<T>;
  constexpr int64_t kChunkRows = 64, kMaxCols = 1024;
  if constexpr (kSumCols) {
    if (cols <= kMaxCols) {
      A chunk[kMaxCols];
      for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
        std::fill(chunk, chunk + cols, A(0));
        relu_grad_rows<T, kWriteGrad, true>(g, out, gm, chunk, c0, std::min(r1, c0 + kChunkRows), cols);
        for (int64_t c = 0; c < cols; ++c) col_sums[c] += static_cast<double>(chunk[c]);
      }
      return;
    }
  }
  relu_grad_rows<T, kWriteGrad, kSumCols>(g, out, gm, col_sums, r0, r1, cols);
}

template <typename T>
void relu_grad(const T* g, const T* out, T* gm, double* col_sums, int64_t r0, int64_t r1, int64_t cols) {
  if (gm && col_sums) relu_grad_impl<T, true, true>(g, out, gm, col_sums, r0, r1, cols);
  else if (gm) relu_grad_impl<T, true, false>(g, out, gm, col_sums, r0, r1, cols);
  else if (col_sums) relu_grad_impl<T, false, true>(g, out, gm, col_sums, r0, r1, cols);
}

template <typename T, bool kGrad, bool kLoss>
double mse_impl(const T* __restrict x, const T* __restrict t, T* __restrict grad, T* __restrict loss,
                acc_t<T> grad_scale, int64_t n) {
  using A = acc_t<T>;
  constexpr int L = kLanes<A>;
  // Vector lanes of A over chunks of 64 steps, each chunk's lanes then added in double: the
  // inner loop stays in A (vectorized), and no running sum in A grows over more than 64
  // terms (a float32 one over a whole block drifted by hundreds of ulps).
  constexpr int64_t kChunk = 64 * L;
  const int64_t full = n - n % L;
  double sums[L] = {};
  for (int64_t c0 = 0; c0 < full; c0 += kChunk) {
    const int64_t c1 = std::min(full, c0 + kChunk);
    A lanes[L] = {};
    for (int64_t i = c0; i < c1; i += L) {
      for (int j = 0; j < L; ++j) {
        A d = load(x + i + j) - load(t + i + j);
        lanes[j] += d * d;
        if constexpr (kGrad) store(grad + i + j, d * grad_scale);
        if constexpr (kLoss) store(loss + i + j, d * d);
      }
    }
    for (int j = 0; j < L; ++j) sums[j] += static_cast<double>(lanes[j]);
  }
  for (int64_t i = full; i < n; ++i) {
    A d = load(x + i) - load(t + i);
    sums[i - full] += static_cast<double>(d * d);
    if constexpr (kGrad) store(grad + i, d * grad_scale);
    if constexpr (kLoss) store(loss + i, d * d);
  }
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) sums[j] += sums[j + w];
  return sums[0];
}

template <typename T>
double mse(const T* x, const T* t, T* grad, T* loss, acc_t<T> grad_scale, int64_t n) {
  if (grad && loss) return mse_impl<T, true, true>(x, t, grad, loss, grad_scale, n);
  if (grad) return mse_impl<T, true, false>(x, t, grad, loss, grad_scale, n);
  if (loss) return mse_impl<T, false, true>(x, t, grad, loss, grad_scale, n);
  return mse_impl<T, false, false>(x, t, grad, loss, grad_scale, n);
}

// torch.optim.Adam's single-tensor update, op for op (lerp, addcmul, sqrt / bc2 + eps,
// addcdiv), fused into one pass that reads and writes each element of the state once.
template <typename T, WeightDecay kWD, bool kAmsgrad, bool kLerpLow>
void adam_impl(const AdamTensor<T>& p, const AdamScalars<acc_t<T>>& s, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  T* __restrict param = p.param;
  const T* __restrict grad = p.grad;
  T* __restrict exp_avg = p.exp_avg;
  T* __restrict exp_avg_sq = p.exp_avg_sq;
  T* __restrict max_sq = p.max_exp_avg_sq;
  const A w1 = s.lerp_weight, one_minus_w1 = A(1) - s.lerp_weight;
  const A b2 = s.beta2, w2 = s.one_minus_beta2;
  const A decay = s.decay;
  const A wd = s.weight_decay, sign = s.grad_sign, eps = s.eps;
  // A multiply by 1/sqrt(1 - beta2^t) instead of torch's divide: one division less per
  // element (the update's cost on AVX-512), within an ulp of torch's denominator.
  const A inv_bc2 = A(1) / s.bias_corr2_sqrt, neg_step = -s.step_size;
  for (int64_t i = i0; i < i1; ++i) {
    A g = load(grad + i) * sign;
    A w = load(param + i);
    if constexpr (kWD == WeightDecay::l2) g = g + wd * w;
    if constexpr (kWD == WeightDecay::decoupled) w = w * decay;
    A m = load(exp_avg + i);
    if constexpr (kLerpLow) m = m + w1 * (g - m);  // ATen's lerp switches form at weight 0.5
    else m = g - (g - m) * one_minus_w1;
    A v = load(exp_avg_sq + i) * b2 + w2 * g * g;
    A vmax = v;
    if constexpr (kAmsgrad) {
      A old = load(max_sq + i);
      vmax = (old != old || old > v) ? old : v;  // torch.maximum: NaN wins
      store(max_sq + i, vmax);
    }
    A denom = std::sqrt(vmax) * inv_bc2 + eps;
    w = w + neg_step * (m / denom);
    store(exp_avg + i, m);
    store(exp_avg_sq + i, v);
    store(param + i, w);
  }
}

template <typename T, WeightDecay kWD>
void adam_wd(const AdamTensor<T>& p, const AdamScalars<acc_t<T>>& s, int64_t i0, int64_t i1) {
  const bool low = s.lerp_weight < acc_t<T>(0.5);
  if (s.amsgrad) {
    low ? adam_impl<T, kWD, true, true>(p, s, i0, i1) : adam_impl<T, kWD, true, false>(p, s, i0, i1);
  } else {
    low ? adam_impl<T, kWD, false, true>(p, s, i0, i1) : adam_impl<T, kWD, false, false>(p, s, i0, i1);
  }
}

template <typename T>
void adam(const AdamTensor<T>& p, const AdamScalars<acc_t<T>>& s, int64_t i0, int64_t i1) {
  switch (s.wd_mode) {
    case WeightDecay::none: return adam_wd<T, WeightDecay::none>(p, s, i0, i1);
    case WeightDecay::l2: return adam_wd<T, WeightDecay::l2>(p, s, i0, i1);
    case WeightDecay::decoupled: return adam_wd<T, WeightDecay::decoupled>(p, s, i0, i1);
  }
}

template <typename T>
Kernels<T> make_kernels() {
  return Kernels<T>{&bias_relu<T>, &relu_grad<T>, &mse<T>, &adam<T>};
}

}  // namespace

const KernelSet& kernel_set() {
  static const KernelSet set{AIAAS_STR(AIAAS_FAST_ISA), make_kernels<float>(), make_kernels<double>(),
                             make_kernels<bf16>(), make_kernels<f16>()};
  return set;
}

}  // namespace aiaas_fast::cpu::AIAAS_CAT(isa_, AIAAS_FAST_ISA)
