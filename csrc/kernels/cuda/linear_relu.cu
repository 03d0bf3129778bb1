// linear_relu's elementwise kernels: the bias+ReLU epilogue of the fallback forward path
// (after a plain matrix product), and the backward's single pass that applies the ReLU mask
// and sums the bias gradient. The fused GEMM itself is in linear_relu_gemm.cu.
#include "kernels/cuda/common.cuh"

namespace aiaas_fast::cuda {
namespace {
using namespace detail;

template <typename T>
__global__ void bias_relu_kernel(T* __restrict__ out, const T* __restrict__ bias, int64_t total, int64_t cols) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    A v = to_acc(out[i]);
    if (bias) v += to_acc(bias[i % cols]);
    out[i] = from_acc<T>(v < A(0) ? A(0) : v);  // written so that NaN passes through, as torch.relu
  }
}

// Tiles of tile_rows rows x 32 columns; a block is 32 x kRowGroups threads, thread (tx, ty)
// walks column tx over the rows ty, ty + kRowGroups, ... of its tile, so each warp reads 32
// consecutive elements of a row. The per-thread sums are then added over ty in a fixed
// order, giving one partial sum per (row tile, column) in `partial`.
constexpr int kRowGroups = 8;
constexpr int64_t kRowsPerBlock = 256;
constexpr int64_t kMaxGridY = 65535;

// The sums are in double (cheap here: the pass is bound by memory): a float32 running sum
// over thousands of rows drifts by hundreds of ulps, where torch's stays within a few.
template <typename T, bool kWriteGrad, bool kSumCols>
__global__ void relu_grad_kernel(const T* __restrict__ g, const T* __restrict__ out, T* __restrict__ gm,
                                 double* __restrict__ partial, int64_t rows, int64_t cols, int64_t tile_rows) {
  using A = acc_t<T>;
  __shared__ double sums[kRowGroups][32];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * tile_rows;
  const int64_t r1 = r0 + tile_rows < rows ? r0 + tile_rows : rows;
  double s = 0;
  if (c < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowGroups) {
      const int64_t i = r * cols + c;
      // threshold_backward's rule: zero where out <= 0, so NaN outputs pass the gradient.
      const A v = to_acc(out[i]) <= A(0) ? A(0) : to_acc(g[i]);
      if constexpr (kWriteGrad) gm[i] = from_acc<T>(v);
      if constexpr (kSumCols) s += static_cast<double>(v);
    }
  }
  if constexpr (kSumCols) {
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
      double total = sums[0][threadIdx.x];
      for (int j = 1; j < kRowGroups; ++j) total += sums[j][threadIdx.x];
      partial[int64_t(blockIdx.y) * cols + c] = total;
    }
  }
}

// Stage two: grad_bias[c] = sum over row tiles of partial[tile, c], in tile order.
template <typename T>
__global__ void column_sum_kernel(const double* __restrict__ partial, T* __restrict__ grad_bias, int64_t tiles,
                                  int64_t cols) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  double total = 0;
  for (int64_t b = 0; b < tiles; ++b) total += partial[b * cols + c];
  grad_bias[c] = from_acc<T>(static_cast<acc_t<T>>(total));
}

}  // namespace

cudaError_t bias_relu(DType dtype, void* out, const void* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(total, threads), int64_t(1) << 16);
    bias_relu_kernel<T><<<unsigned(blocks), threads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(bias),
                                                                  total, cols);
    return cudaGetLastError();
  });
}

// Rows per tile: 256, or more where the tiles would not fit the grid's y dimension (past
// 16.7M rows). A function of the row count alone, so the sums' order, and bits, are too.
static int64_t tile_rows(int64_t rows) {
  const int64_t need = detail::ceil_div(detail::ceil_div(rows, kMaxGridY), kRowGroups) * kRowGroups;
  return std::max(kRowsPerBlock, need);
}
static int64_t row_tiles(int64_t rows) { return detail::ceil_div(rows, tile_rows(rows)); }

size_t relu_grad_workspace_bytes(DType, int64_t rows, int64_t cols) {
  return size_t(std::max<int64_t>(row_tiles(rows), 1)) * size_t(cols) * sizeof(double);
}

cudaError_t relu_grad(DType dtype, const void* g, const void* out, void* gm, void* grad_bias, void* workspace,
                      int64_t rows, int64_t cols, cudaStream_t stream) {
  if (cols == 0 || (!gm && !grad_bias)) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t tiles = row_tiles(rows), per_tile = tile_rows(rows);
    auto* gp = static_cast<const T*>(g);
    auto* op = static_cast<const T*>(out);
    auto* mp = static_cast<T*>(gm);
    auto* pp = static_cast<double*>(workspace);
    if (tiles > 0) {
      const dim3 grid(unsigned(ceil_div(cols, 32)), unsigned(tiles));
      const dim3 block(32, kRowGroups);
      if (gm && grad_bias)
        relu_grad_kernel<T, true, true><<<grid, block, 0, stream>>>(gp, op, mp, pp, rows, cols, per_tile);
      else if (gm)
        relu_grad_kernel<T, true, false><<<grid, block, 0, stream>>>(gp, op, mp, pp, rows, cols, per_tile);
      else
        relu_grad_kernel<T, false, true><<<grid, block, 0, stream>>>(gp, op, mp, pp, rows, cols, per_tile);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (!grad_bias) return cudaSuccess;  // (rows == 0 with gm only: nothing to sum, nowhere to write)
    column_sum_kernel<T><<<unsigned(ceil_div(cols, 256)), 256, 0, stream>>>(pp, static_cast<T*>(grad_bias), tiles, cols);
    return cudaGetLastError();
  });
}

}  // namespace aiaas_fast::cuda
