// mse_loss in one pass: each element of x and t is read once (16-byte vector loads where
// the pointers allow), the gradient and the elementwise loss written in the same pass, and
// the squared errors summed in two fixed stages so the loss has the same bits every run.
#include "kernels/cuda/common.cuh"

namespace aiaas_fast::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;     // the grid depends on n only, never on the GPU: same bits anywhere
constexpr int kVecPerThread = 4;     // vectors a thread handles before the grid is wide enough

int64_t grid_for(int64_t n) {
  const int64_t per_block = int64_t(kThreads) * kVecPerThread * 8;  // 8: the widest vector (16-bit types)
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, ceil_div(n, per_block)));
}

// A block's sum of its threads' values, added in the same order every time.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;  // valid in thread 0
}

// Each thread takes groups of VEC consecutive elements, loaded as one 16-byte vector where
// the pointers are aligned (kVecLoads) and element by element otherwise: the same groups and
// the same order of addition either way, so the loss has the same bits for a misaligned view
// as for an aligned copy of it.
template <typename T, int VEC, bool kVecLoads, bool kGrad, bool kLoss>
__global__ void __launch_bounds__(kThreads) mse_kernel(const T* __restrict__ x, const T* __restrict__ t,
                                                       T* __restrict__ grad, T* __restrict__ loss,
                                                       acc_t<T>* __restrict__ partial, acc_t<T> grad_scale,
                                                       int64_t n) {
  using A = acc_t<T>;
  using V = Vec<T, VEC>;
  A sum = A(0);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t nvec = n / VEC;
  const int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    V xv, tv, gv, lv;
    if constexpr (kVecLoads) {
      xv = reinterpret_cast<const V*>(x)[v];
      tv = reinterpret_cast<const V*>(t)[v];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xv.v[j] = x[v * VEC + j];
        tv.v[j] = t[v * VEC + j];
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = to_acc(xv.v[j]) - to_acc(tv.v[j]);
      sum += d * d;
      if constexpr (kGrad) gv.v[j] = from_acc<T>(d * grad_scale);
      if constexpr (kLoss) lv.v[j] = from_acc<T>(d * d);
    }
    if constexpr (kVecLoads) {
      if constexpr (kGrad) reinterpret_cast<V*>(grad)[v] = gv;
      if constexpr (kLoss) reinterpret_cast<V*>(loss)[v] = lv;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if constexpr (kGrad) grad[v * VEC + j] = gv.v[j];
        if constexpr (kLoss) loss[v * VEC + j] = lv.v[j];
      }
    }
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // the last n % VEC elements
    const A d = to_acc(x[i]) - to_acc(t[i]);
    sum += d * d;
    if constexpr (kGrad) grad[i] = from_acc<T>(d * grad_scale);
    if constexpr (kLoss) loss[i] = from_acc<T>(d * d);
  }
  if (partial) {
    const A total = block_sum(sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

// Stage two: the partial sums added in double in a fixed order, the mean taken in double
// (as the CPU op does), and rounded once to the loss's dtype.
template <typename T>
__global__ void __launch_bounds__(kThreads) mse_finish_kernel(const acc_t<T>* __restrict__ partial, int64_t blocks,
                                                              T* __restrict__ loss, double divisor) {
  double s = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) s += double(partial[b]);
  const double total = block_sum(s);
  if (threadIdx.x == 0) loss[0] = from_acc<T>(acc_t<T>(total / divisor));
}

template <typename T, int VEC, bool kVecLoads>
cudaError_t launch(const T* x, const T* t, T* grad, T* loss_elems, acc_t<T>* partial, acc_t<T> scale, int64_t n,
                   int64_t blocks, cudaStream_t stream) {
  const dim3 grid{unsigned(blocks)}, block{unsigned(kThreads)};
  if (grad && loss_elems)
    mse_kernel<T, VEC, kVecLoads, true, true><<<grid, block, 0, stream>>>(x, t, grad, loss_elems, partial, scale, n);
  else if (grad)
    mse_kernel<T, VEC, kVecLoads, true, false><<<grid, block, 0, stream>>>(x, t, grad, loss_elems, partial, scale, n);
  else if (loss_elems)
    mse_kernel<T, VEC, kVecLoads, false, true><<<grid, block, 0, stream>>>(x, t, grad, loss_elems, partial, scale, n);
  else
    mse_kernel<T, VEC, kVecLoads, false, false><<<grid, block, 0, stream>>>(x, t, grad, loss_elems, partial, scale, n);
  return cudaGetLastError();
}

}  // namespace

size_t mse_loss_workspace_bytes(int64_t n) { return size_t(grid_for(n)) * sizeof(double); }

cudaError_t mse_loss(DType dtype, const void* x, const void* t, void* grad, void* loss, void* workspace,
                     double grad_scale, Reduction reduction, int64_t n, cudaStream_t stream) {
  return dispatch(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    constexpr int kVec = 16 / sizeof(T);
    const bool reduce = reduction != Reduction::none;
    auto* xp = static_cast<const T*>(x);
    auto* tp = static_cast<const T*>(t);
    auto* gp = static_cast<T*>(grad);
    T* loss_elems = reduce ? nullptr : static_cast<T*>(loss);
    A* partial = reduce ? static_cast<A*>(workspace) : nullptr;
    const int64_t blocks = grid_for(n);
    if (n > 0) {
      const bool vec_ok = aligned(xp, 16) && aligned(tp, 16) && (!gp || aligned(gp, 16)) &&
                          (!loss_elems || aligned(loss_elems, 16));
      const cudaError_t err =
          vec_ok ? launch<T, kVec, true>(xp, tp, gp, loss_elems, partial, A(grad_scale), n, blocks, stream)
                 : launch<T, kVec, false>(xp, tp, gp, loss_elems, partial, A(grad_scale), n, blocks, stream);
      if (err != cudaSuccess) return err;
    }
    if (!reduce) return cudaSuccess;
    // An empty input sums no blocks: 0 for a sum, 0 / 0 = NaN for a mean, as torch.
    const double divisor = reduction == Reduction::mean ? double(n) : 1.0;
    mse_finish_kernel<T><<<1, kThreads, 0, stream>>>(partial, n > 0 ? blocks : 0, static_cast<T*>(loss), divisor);
    return cudaGetLastError();
  });
}

}  // namespace aiaas_fast::cuda
