// The small-width MLP kernels (mlp.h), written with GCC vector types at the width of the
// instruction set this copy is built for (AIAAS_FAST_ISA): 16 floats on AVX-512, 8 on AVX2,
// 4 on the x86-64 baseline. Tiles of 4 outputs x 2 vectors of batch keep 8 accumulators in
// registers on every one of them.
#include "kernels/cpu/mlp.h"

#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define AIAAS_CAT_(a, b) a##b
#define AIAAS_CAT(a, b) AIAAS_CAT_(a, b)

namespace aiaas_fast::cpu::AIAAS_CAT(isa_, AIAAS_FAST_ISA) {
namespace {

#if defined(AIAAS_FAST_MLP_VW)  // tests/test_mlp_kernels.py: another width's code on this CPU
constexpr int VW = AIAAS_FAST_MLP_VW;
#elif defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX2__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
static_assert(kBatchAlign % VW == 0, "a row of the batch must hold whole vectors");
template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};
typedef Vec<VW>::type vf;

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);  // one aligned vector move; memcpy keeps it legal C++
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{} + s; }
inline vf relu(vf v) { return v < vf{} ? vf{} : v; }  // NaN passes through, as torch.relu
// The sum of a vector's lanes as a fixed tree: lanes k and k + W/2 added, then the same on
// that half. The halves are register moves; a loop over the lanes went through the stack.
template <int W>
inline float hsum(typename Vec<W>::type v) {
  if constexpr (W == 2) {
    return v[0] + v[1];
  } else {
    typename Vec<W / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<W / 2>(lo + hi);
  }
}
inline float hsum(vf v) { return hsum<VW>(v); }

// ---- forward: z[o, :] = act(b[o] + sum_i w[o, i] a[i, :])
template <int OT, int CT>
inline void forward_tile(const float* __restrict w, const float* __restrict b, const float* __restrict a,
                         float* __restrict z, int64_t in, int64_t ld, int64_t o0, int64_t j0, bool act) {
  vf acc[OT][CT];
  for (int r = 0; r < OT; ++r)
    for (int c = 0; c < CT; ++c) acc[r][c] = splat(b ? b[o0 + r] : 0.f);
  for (int64_t i = 0; i < in; ++i) {
    vf x[CT];
    for (int c = 0; c < CT; ++c) x[c] = vload(a + i * ld + j0 + c * VW);
    for (int r = 0; r < OT; ++r) {
      const vf wv = splat(w[(o0 + r) * in + i]);
      for (int c = 0; c < CT; ++c) acc[r][c] += wv * x[c];
    }
  }
  for (int r = 0; r < OT; ++r)
    for (int c = 0; c < CT; ++c) vstore(z + (o0 + r) * ld + j0 + c * VW, act ? relu(acc[r][c]) : acc[r][c]);
}

template <int OT>
inline void forward_rows(const float* w, const float* b, const float* a, float* z, int64_t in, int64_t ld,
                         int64_t cols, int64_t o0, bool act) {
  int64_t j = 0;
  for (; j + 2 * VW <= cols; j += 2 * VW) forward_tile<OT, 2>(w, b, a, z, in, ld, o0, j, act);
  for (; j < cols; j += VW) forward_tile<OT, 1>(w, b, a, z, in, ld, o0, j, act);
}

void dense_forward(const float* w, const float* b, const float* a, float* z, int64_t in, int64_t out, int64_t ld,
                   int64_t cols, bool act) {
  int64_t o = 0;
  for (; o + 4 <= out; o += 4) forward_rows<4>(w, b, a, z, in, ld, cols, o, act);
  for (; o < out; ++o) forward_rows<1>(w, b, a, z, in, ld, cols, o, act);
}

void bias_act(float* z, const float* b, int64_t rows, int64_t ld, bool act) {
  for (int64_t r = 0; r < rows; ++r) {
    const vf bv = splat(b ? b[r] : 0.f);
    for (int64_t j = 0; j < ld; j += VW) {
      vf v = vload(z + r * ld + j) + bv;
      vstore(z + r * ld + j, act ? relu(v) : v);
    }
  }
}

// ---- weight gradient: dw[o, i] = sum_j g[o, j] a[i, j], reduced along the batch
template <int OT, int IT>
inline void grad_weight_tile(const float* __restrict g, const float* __restrict a, float* __restrict dw, int64_t in,
                             int64_t ld, int64_t o0, int64_t i0, bool add) {
  vf acc[OT][IT];
  for (int r = 0; r < OT; ++r)
    for (int c = 0; c < IT; ++c) acc[r][c] = vf{};  // not "= {}": GCC zeroes that array with rep stos
  for (int64_t j = 0; j < ld; j += VW) {
    vf x[IT];
    for (int c = 0; c < IT; ++c) x[c] = vload(a + (i0 + c) * ld + j);
    for (int r = 0; r < OT; ++r) {
      const vf gv = vload(g + (o0 + r) * ld + j);
      for (int c = 0; c < IT; ++c) acc[r][c] += gv * x[c];
    }
  }
  for (int r = 0; r < OT; ++r)
    for (int c = 0; c < IT; ++c) {
      float& d = dw[(o0 + r) * in + i0 + c];
      d = add ? d + hsum(acc[r][c]) : hsum(acc[r][c]);
    }
}

template <int OT>
inline void grad_weight_rows(const float* g, const float* a, float* dw, int64_t in, int64_t ld, int64_t o0, bool add) {
  int64_t i = 0;
  for (; i + 2 <= in; i += 2) grad_weight_tile<OT, 2>(g, a, dw, in, ld, o0, i, add);
  for (; i < in; ++i) grad_weight_tile<OT, 1>(g, a, dw, in, ld, o0, i, add);
}

void row_sums(const float* g, float* db, int64_t rows, int64_t ld, bool add) {
  for (int64_t r = 0; r < rows; ++r) {
    vf acc = {};
    for (int64_t j = 0; j < ld; j += VW) acc += vload(g + r * ld + j);
    db[r] = add ? db[r] + hsum(acc) : hsum(acc);
  }
}

void dense_grad_weight(const float* g, const float* a, float* dw, float* db, int64_t in, int64_t out, int64_t ld,
                       bool add) {
  int64_t o = 0;
  for (; o + 4 <= out; o += 4) grad_weight_rows<4>(g, a, dw, in, ld, o, add);
  for (; o < out; ++o) grad_weight_rows<1>(g, a, dw, in, ld, o, add);
  if (db) row_sums(g, db, out, ld, add);
}

// ---- input gradient: ga[i, :] = sum_o w[o, i] g[o, :], masked by the ReLU below
template <int IT, int CT>
inline void grad_input_tile(const float* __restrict w, const float* __restrict g, const float* __restrict a_in,
                            float* __restrict ga, int64_t in, int64_t out, int64_t ld, int64_t i0, int64_t j0) {
  vf acc[IT][CT];
  for (int r = 0; r < IT; ++r)
    for (int c = 0; c < CT; ++c) acc[r][c] = vf{};
  for (int64_t o = 0; o < out; ++o) {
    vf gv[CT];
    for (int c = 0; c < CT; ++c) gv[c] = vload(g + o * ld + j0 + c * VW);
    for (int r = 0; r < IT; ++r) {
      const vf wv = splat(w[o * in + i0 + r]);
      for (int c = 0; c < CT; ++c) acc[r][c] += wv * gv[c];
    }
  }
  for (int r = 0; r < IT; ++r)
    for (int c = 0; c < CT; ++c) {
      const int64_t off = (i0 + r) * ld + j0 + c * VW;
      vf v = acc[r][c];
      // threshold_backward's rule: zero where the output is <= 0.
      if (a_in) v = vload(a_in + off) <= vf{} ? vf{} : v;
      vstore(ga + off, v);
    }
}

template <int IT>
inline void grad_input_rows(const float* w, const float* g, const float* a_in, float* ga, int64_t in, int64_t out,
                            int64_t ld, int64_t cols, int64_t i0) {
  int64_t j = 0;
  for (; j + 2 * VW <= cols; j += 2 * VW) grad_input_tile<IT, 2>(w, g, a_in, ga, in, out, ld, i0, j);
  for (; j < cols; j += VW) grad_input_tile<IT, 1>(w, g, a_in, ga, in, out, ld, i0, j);
}

void dense_grad_input(const float* w, const float* g, const float* a_in, float* ga, int64_t in, int64_t out,
                      int64_t ld, int64_t cols) {
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) grad_input_rows<4>(w, g, a_in, ga, in, out, ld, cols, i);
  for (; i < in; ++i) grad_input_rows<1>(w, g, a_in, ga, in, out, ld, cols, i);
}

void relu_mask(float* g, const float* a, int64_t rows, int64_t ld) {
  for (int64_t k = 0; k < rows * ld; k += VW) vstore(g + k, vload(a + k) <= vf{} ? vf{} : vload(g + k));
}

// ---- loss
double mse_grad(const float* z, const float* y, float* g, int64_t rows, int64_t batch, int64_t ld, float scale) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    float lanes[kBatchAlign] = {};
    int64_t j = 0;
    for (; j + kBatchAlign <= batch; j += kBatchAlign)
      for (int k = 0; k < kBatchAlign; ++k) {
        const float d = z[r * ld + j + k] - y[r * ld + j + k];
        lanes[k] += d * d;
        g[r * ld + j + k] = d * scale;
      }
    for (int k = 0; j < batch; ++j, ++k) {
      const float d = z[r * ld + j] - y[r * ld + j];
      lanes[k] += d * d;
      g[r * ld + j] = d * scale;
    }
    for (; j < ld; ++j) g[r * ld + j] = 0.f;  // padding: no gradient flows from it
    for (float s : lanes) total += s;
  }
  return total;
}

// ---- layout changes at the edges of a step
#if defined(__AVX2__)
// Rows j..j+7, columns c..c+7 of the gathered batch as 8 column vectors: an 8x8 transpose in
// registers, where one element at a time cost ~8% of a small model's step.
inline void transpose8x8(const float* const rows[8], int64_t c, float* xt, int64_t ld, int64_t j) {
  __m256 r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(rows[k] + c);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);      // r_k[0] r_k+1[0] r_k[1] r_k+1[1] | same for [4], [5]
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);  // ... [2], [3] | [6], [7]
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));      // column 0 of 4 rows | column 4
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));  // column 1 | 5
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));  // column 2 | 6
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));  // column 3 | 7
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(xt + (c + q) * ld + j, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
    _mm256_storeu_ps(xt + (c + q + 4) * ld + j, _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
  }
}
#endif

void gather_transpose(const float* x, int64_t ldx, const int64_t* idx, int64_t batch, int64_t cols, float* xt,
                      int64_t ld) {
  int64_t j = 0;
#if defined(__AVX2__)
  for (; j + 8 <= batch && cols >= 8; j += 8) {
    const float* rows[8];
    for (int k = 0; k < 8; ++k) rows[k] = x + (idx ? idx[j + k] : j + k) * ldx;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) transpose8x8(rows, c, xt, ld, j);
    for (; c < cols; ++c)
      for (int k = 0; k < 8; ++k) xt[c * ld + j + k] = rows[k][c];
  }
#endif
  for (; j < batch; ++j) {
    const float* row = x + (idx ? idx[j] : j) * ldx;
    for (int64_t c = 0; c < cols; ++c) xt[c * ld + j] = row[c];
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t j = batch; j < ld; ++j) xt[c * ld + j] = 0.f;
}

void transpose_out(const float* zt, int64_t ld, int64_t batch, int64_t cols, float* y) {
  for (int64_t j = 0; j < batch; ++j)
    for (int64_t c = 0; c < cols; ++c) y[j * cols + c] = zt[c * ld + j];
}

}  // namespace

const MlpKernels& mlp_kernels() {
  static const MlpKernels k{&dense_forward, &bias_act,  &dense_grad_weight, &dense_grad_input, &relu_mask,
                            &row_sums,      &mse_grad,  &gather_transpose,  &transpose_out};
  return k;
}

}  // namespace aiaas_fast::cpu::AIAAS_CAT(isa_, AIAAS_FAST_ISA)
