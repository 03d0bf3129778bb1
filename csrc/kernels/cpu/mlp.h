// Small-width MLP kernels for the training engine: float32, no torch headers, compiled
// once per instruction set like kernels.cpp.
//
// Layout: activations and their gradients are feature-major, (features, ld) with the
// batch along the rows, ld a multiple of kBatchAlign floats and every buffer 64-byte
// aligned. Each kernel then runs along the batch in whole vectors, with a weight as a
// broadcast scalar: no transposes, no horizontal sums on the forward and input-gradient
// passes, and tiles that stay in registers for the narrow layers the engine is for.
// Columns past the batch (padding) hold zeros in the inputs and gradients, so whole
// vectors can be read and written without masks.
#pragma once
#include <cstdint>

namespace aiaas_fast::cpu {

constexpr int64_t kBatchAlign = 16;  // one AVX-512 vector of floats

struct MlpKernels {
  // z[o, j] = act(b[o] + sum_i w[o, i] a[i, j]) for o < out, j < cols (a multiple of
  // kBatchAlign); act is ReLU when relu. w: (out, in) row-major (nn.Linear's layout); b may
  // be null. Threads split the batch by passing a, z offset by their first column.
  void (*dense_forward)(const float* w, const float* b, const float* a, float* z, int64_t in, int64_t out,
                        int64_t ld, int64_t cols, bool relu);
  // z[o, :] = act(z[o, :] + b[o]): the epilogue after a BLAS product. b may be null.
  void (*bias_act)(float* z, const float* b, int64_t rows, int64_t ld, bool relu);
  // dw[o, i] = sum_j g[o, j] a[i, j]; db[o] = sum_j g[o, j] (db may be null), j < ld; with
  // add, these sums are added to dw and db (the engine's later chunks of a large batch).
  // Threads split the outputs by passing g, dw, db offset by their first row.
  void (*dense_grad_weight)(const float* g, const float* a, float* dw, float* db, int64_t in, int64_t out,
                            int64_t ld, bool add);
  // ga[i, j] = sum_o w[o, i] g[o, j], then times [a_in[i, j] > 0] when a_in is not null
  // (the ReLU of the layer below, read from its output), for j < cols.
  void (*dense_grad_input)(const float* w, const float* g, const float* a_in, float* ga, int64_t in, int64_t out,
                           int64_t ld, int64_t cols);
  // g[r, :] *= [a[r, :] > 0] over rows r < rows: the ReLU mask after a BLAS product.
  void (*relu_mask)(float* g, const float* a, int64_t rows, int64_t ld);
  // db[r] = sum_j g[r, j]; with add, db[r] += it.
  void (*row_sums)(const float* g, float* db, int64_t rows, int64_t ld, bool add);
  // MSE against y (feature-major like z): g = (z - y) * scale for columns < batch, 0 past
  // it; returns sum (z - y)^2 over the batch.
  double (*mse_grad)(const float* z, const float* y, float* g, int64_t rows, int64_t batch, int64_t ld,
                     float scale);
  // xt[c, j] = x[idx ? idx[j] : j, c] for j < batch (x row-major with row stride ldx),
  // zeros for batch <= j < ld: gathers a mini-batch and turns it feature-major in one pass.
  void (*gather_transpose)(const float* x, int64_t ldx, const int64_t* idx, int64_t batch, int64_t cols,
                           float* xt, int64_t ld);
  // y[j, c] = zt[c, j] for j < batch: back to row-major (y row stride cols).
  void (*transpose_out)(const float* zt, int64_t ld, int64_t batch, int64_t cols, float* y);
};

namespace isa_default { const MlpKernels& mlp_kernels(); }
namespace isa_avx2 { const MlpKernels& mlp_kernels(); }
namespace isa_avx512 { const MlpKernels& mlp_kernels(); }

}  // namespace aiaas_fast::cpu
