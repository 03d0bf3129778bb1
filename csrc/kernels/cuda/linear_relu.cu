// linear_relu's elementwise kernels: the bias+ReLU epilogue of the fallback forward path
// (after a plain matrix product), and the backward's single pass that applies the ReLU mask
// and sums the bias gradient. The fused GEMM itself is in linear_relu_gemm.cu.
#include "kernels/cuda/common.cuh"

namespace aiaas_fast::cuda {
namespace {
using namespace detail;

// The grid's cap: past it (16.7M elements at 256 threads) each thread loops over the rest.
// The CUDA emulator's build (tests/cuda_emulator) lowers it, so that its checks run the loop.
#ifndef AIAAS_FAST_BIAS_RELU_MAX_BLOCKS
#define AIAAS_FAST_BIAS_RELU_MAX_BLOCKS 65536
#endif

template <typename T>
__global__ void bias_relu_kernel(T* __restrict__ out, const T* __restrict__ bias, int64_t total, int64_t cols) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    A v = to_acc(out[i]);
    if (bias) v += to_acc(bias[i % cols]);
    out[i] = from_acc<T>(v < A(0) ? A(0) : v);  // written so that NaN passes through, as torch.relu
  }
}

// The backward's pass. A block is 256 threads, col_threads<T>(cols) x the rest (x: column
// groups, y: row groups); thread (tx, ty) takes the VEC = 16 / sizeof(T) columns of its group (one
// 16-byte load of g and of out, one store of gm, where the pointers and the row length
// allow, else element by element: the same elements and sums either way) over the rows
// ty, ty + row_groups, ... of its block's row tile. Narrow matrices get fewer column groups
// and more row groups, so every lane has work. The bias gradient: each thread sums its
// rows in double, a fixed tree adds the row groups (one partial sum per tile and column),
// and a second kernel adds the tiles in a fixed order. Every choice depends on the shape
// and dtype alone, so the bits do too. The sums are in double (cheap: the pass is bound by
// memory): a float32 running sum over thousands of rows drifts by hundreds of ulps.
constexpr int kThreads = 256;
constexpr int64_t kMaxTiles = 256;       // row tiles, so the second stage adds few partial sums
constexpr int64_t kMinRowsPerThread = 4;

// Column groups per block: the groups a row has, rounded up to a power of two, at most 32.
template <typename T>
int col_threads(int64_t cols) {
  const int64_t groups = ceil_div(cols, 16 / int64_t(sizeof(T)));
  int tx = 1;
  while (tx < 32 && tx < groups) tx *= 2;
  return tx;
}

// Rows per tile: at least kMinRowsPerThread per thread, more where there would be more than
// kMaxTiles tiles.
int64_t tile_rows_for(int64_t rows, int row_groups) {
  const int64_t per_thread = std::max(kMinRowsPerThread, ceil_div(rows, int64_t(row_groups) * kMaxTiles));
  return per_thread * row_groups;
}

// A block covers col_threads * VEC columns. On the vector path thread tx takes the VEC
// consecutive columns of its 16-byte group; on the element path it takes every col_threads-th
// column of the block's span (tx, tx + col_threads, ...), so that a warp's accesses stay consecutive. Either way
// one thread owns each column, over the same rows, and the sums keep their order and bits.
template <typename T, bool kVecLoads, bool kWriteGrad, bool kSumCols, bool kDirect>
__global__ void __launch_bounds__(kThreads)
    relu_grad_kernel(const T* __restrict__ g, const T* __restrict__ out, T* __restrict__ gm,
                     double* __restrict__ partial, T* __restrict__ grad_bias, int64_t rows, int64_t cols,
                     int64_t tile_rows) {
  using A = acc_t<T>;
  constexpr int VEC = 16 / sizeof(T);
  using V = Vec<T, VEC>;
  // 16 KB; column-major ([column of the thread's set][thread]), so a warp's accesses to one
  // column set are consecutive doubles: no bank conflicts.
  __shared__ double sums[VEC * kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, row_groups = blockDim.y, col_threads = blockDim.x;
  const int thread = ty * col_threads + tx;
  const int64_t span = int64_t(blockIdx.x) * col_threads * VEC;  // the block's first column
  // This thread's j-th column.
  auto col = [&](int j) -> int64_t { return kVecLoads ? span + int64_t(tx) * VEC + j : span + int64_t(j) * col_threads + tx; };
  const int64_t r0 = int64_t(blockIdx.y) * tile_rows;
  const int64_t r1 = r0 + tile_rows < rows ? r0 + tile_rows : rows;
  double s[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = 0;
  if (col(0) < cols) {
    for (int64_t r = r0 + ty; r < r1; r += row_groups) {
      const T* g_row = g + r * cols;
      const T* out_row = out + r * cols;
      V gv, ov, mv;
      if constexpr (kVecLoads) {  // cols % VEC == 0: the whole group is in the row
        gv = *reinterpret_cast<const V*>(g_row + col(0));
        ov = *reinterpret_cast<const V*>(out_row + col(0));
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const bool in = col(j) < cols;
          gv.v[j] = in ? g_row[col(j)] : T(0.0f);
          ov.v[j] = in ? out_row[col(j)] : T(0.0f);
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // threshold_backward's rule: zero where out <= 0, so NaN outputs pass the gradient.
        const A v = to_acc(ov.v[j]) <= A(0) ? A(0) : to_acc(gv.v[j]);
        mv.v[j] = from_acc<T>(v);
        if constexpr (kSumCols) s[j] += static_cast<double>(v);
      }
      if constexpr (kWriteGrad) {
        T* gm_row = gm + r * cols;
        if constexpr (kVecLoads) {
          *reinterpret_cast<V*>(gm_row + col(0)) = mv;
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            if (col(j) < cols) gm_row[col(j)] = mv.v[j];
        }
      }
    }
  }
  if constexpr (kSumCols) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) sums[j * kThreads + thread] = s[j];
    // The row groups added pairwise, a fixed tree (row_groups is a power of two).
    for (int half = row_groups / 2; half > 0; half /= 2) {
      __syncthreads();
      if (ty < half)
#pragma unroll
        for (int j = 0; j < VEC; ++j) sums[j * kThreads + thread] += sums[j * kThreads + thread + half * col_threads];
    }
    if (ty == 0) {
      for (int j = 0; j < VEC; ++j) {
        const int64_t c = col(j);
        if (c >= cols) continue;
        const double total = sums[j * kThreads + tx];
        if constexpr (kDirect) grad_bias[c] = from_acc<T>(static_cast<A>(total));  // one tile: the sum
        else partial[int64_t(blockIdx.y) * cols + c] = total;
      }
    }
  }
}

// Stage two: grad_bias[c] = the sum over row tiles of partial[tile, c]. Thread (tx, ty) adds
// the tiles ty, ty + 8, ... of column c, in order; a fixed tree adds the 8.
constexpr int kSumGroups = 8;
template <typename T>
__global__ void __launch_bounds__(32 * kSumGroups)
    column_sum_kernel(const double* __restrict__ partial, T* __restrict__ grad_bias, int64_t tiles, int64_t cols) {
  __shared__ double sums[kSumGroups][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * int64_t(32) + tx;
  double total = 0;
  if (c < cols)
#pragma unroll 8
    for (int64_t b = ty; b < tiles; b += kSumGroups) total += partial[b * cols + c];
  sums[ty][tx] = total;
  for (int half = kSumGroups / 2; half > 0; half /= 2) {
    __syncthreads();
    if (ty < half) sums[ty][tx] += sums[ty + half][tx];
  }
  if (ty == 0 && c < cols) grad_bias[c] = from_acc<T>(static_cast<acc_t<T>>(sums[0][tx]));
}

template <typename T>
struct ReluGradShape {
  int tx, ty;
  int64_t tile_rows, tiles;
  explicit ReluGradShape(int64_t rows, int64_t cols)
      : tx(col_threads<T>(cols)), ty(kThreads / tx), tile_rows(tile_rows_for(rows, ty)),
        tiles(ceil_div(rows, tile_rows)) {}
};

template <typename T, bool kVecLoads, bool kWriteGrad, bool kSumCols>
cudaError_t launch_relu_grad(const ReluGradShape<T>& shape, const T* g, const T* out, T* gm, double* partial,
                             T* grad_bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int64_t kVec = 16 / sizeof(T);
  const dim3 grid(unsigned(ceil_div(ceil_div(cols, kVec), shape.tx)), unsigned(shape.tiles));
  const dim3 block(unsigned(shape.tx), unsigned(shape.ty));
  if (kSumCols && shape.tiles == 1)
    relu_grad_kernel<T, kVecLoads, kWriteGrad, kSumCols, true>
        <<<grid, block, 0, stream>>>(g, out, gm, partial, grad_bias, rows, cols, shape.tile_rows);
  else
    relu_grad_kernel<T, kVecLoads, kWriteGrad, kSumCols, false>
        <<<grid, block, 0, stream>>>(g, out, gm, partial, grad_bias, rows, cols, shape.tile_rows);
  return cudaGetLastError();
}

template <typename T, bool kVecLoads>
cudaError_t launch_relu_grad(const ReluGradShape<T>& shape, const T* g, const T* out, T* gm, double* partial,
                             T* grad_bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (gm && grad_bias)
    return launch_relu_grad<T, kVecLoads, true, true>(shape, g, out, gm, partial, grad_bias, rows, cols, stream);
  if (gm) return launch_relu_grad<T, kVecLoads, true, false>(shape, g, out, gm, partial, grad_bias, rows, cols, stream);
  return launch_relu_grad<T, kVecLoads, false, true>(shape, g, out, gm, partial, grad_bias, rows, cols, stream);
}

}  // namespace

cudaError_t bias_relu(DType dtype, void* out, const void* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, threads), AIAAS_FAST_BIAS_RELU_MAX_BLOCKS);
    bias_relu_kernel<T><<<unsigned(blocks), threads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(bias),
                                                                  total, cols);
    return cudaGetLastError();
  });
}

size_t relu_grad_workspace_bytes(DType dtype, int64_t rows, int64_t cols) {
  int64_t tiles = 0;
  dispatch(dtype, [&](auto* tag) {
    tiles = ReluGradShape<std::remove_pointer_t<decltype(tag)>>(rows, cols).tiles;
    return cudaSuccess;
  });
  return tiles > 1 ? size_t(tiles) * size_t(cols) * sizeof(double) : 0;  // one tile writes grad_bias itself
}

cudaError_t relu_grad(DType dtype, const void* g, const void* out, void* gm, void* grad_bias, void* workspace,
                      int64_t rows, int64_t cols, cudaStream_t stream) {
  if (cols == 0 || (!gm && !grad_bias)) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    const ReluGradShape<T> shape(rows, cols);
    auto* gp = static_cast<const T*>(g);
    auto* op = static_cast<const T*>(out);
    auto* mp = static_cast<T*>(gm);
    auto* bp = static_cast<T*>(grad_bias);
    auto* pp = static_cast<double*>(workspace);
    if (shape.tiles > 0) {
      const bool vec_ok = cols % (16 / int64_t(sizeof(T))) == 0 && aligned(gp, 16) && aligned(op, 16) &&
                          (!mp || aligned(mp, 16));
      const cudaError_t err = vec_ok ? launch_relu_grad<T, true>(shape, gp, op, mp, pp, bp, rows, cols, stream)
                                     : launch_relu_grad<T, false>(shape, gp, op, mp, pp, bp, rows, cols, stream);
      if (err != cudaSuccess || !grad_bias || shape.tiles == 1) return err;
    } else if (!grad_bias) {
      return cudaSuccess;  // no rows, gm only: nothing to write
    }
    // Several tiles, or no rows at all (the bias gradient is then zero: 0 tiles summed).
    column_sum_kernel<T><<<unsigned(ceil_div(cols, 32)), dim3(32, kSumGroups), 0, stream>>>(pp, bp, shape.tiles, cols);
    return cudaGetLastError();
  });
}

}  // namespace aiaas_fast::cuda
