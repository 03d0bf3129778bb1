// Adam / AdamW for a whole parameter group as multi-tensor apply: a table of pointers in
// the kernel's argument (no host-to-device copy, nothing to keep alive), one block per
// chunk of kChunk elements of any tensor, one launch per table. The math is the CPU op's
// (csrc/kernels/cpu/kernels.cpp), which is torch.optim.Adam's single-tensor update op for
// op. The bias corrections are computed on the device from the step tensor, so nothing is
// read back to the host and the update can be captured in a CUDA graph.
#include "kernels/cuda/common.cuh"

namespace aiaas_fast::cuda {
namespace {
using namespace detail;

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;
constexpr int kVec = 4;  // elements per access where a tensor's pointers allow it

enum StepKind : unsigned char { kHostStep = 0, kStepF32 = 1, kStepF64 = 2 };

// Passed by value as the kernel's argument: it must stay under the 4 KiB that every
// architecture and driver accepts.
struct Table {
  void* param[kAdamMaxTensors];
  const void* grad[kAdamMaxTensors];
  void* exp_avg[kAdamMaxTensors];
  void* exp_avg_sq[kAdamMaxTensors];
  void* max_exp_avg_sq[kAdamMaxTensors];
  void* step[kAdamMaxTensors];
  int64_t n[kAdamMaxTensors];
  double host_step[kAdamMaxTensors];
  unsigned char step_kind[kAdamMaxTensors];
  unsigned char vector_ok[kAdamMaxTensors];  // every pointer aligned for kVec-element accesses
  unsigned char block_tensor[kAdamMaxBlocks];
  int block_chunk[kAdamMaxBlocks];
  int tensors;
};

struct Scalars {  // as the host passes them: the CPU op folds the same in double
  double lr, beta1, beta2, weight_decay, eps;
  int wd_mode;
  bool amsgrad, maximize;
};

static_assert(sizeof(Table) + sizeof(Scalars) <= 4000, "the Adam table must fit in a 4 KiB kernel argument");

__global__ void increment_steps_kernel(Table table) {
  const int i = threadIdx.x;
  if (i >= table.tensors) return;
  // Atomic: two params may share one step tensor, which then counts twice, as
  // torch._foreach_add_ counts it (exact either way: whole numbers).
  if (table.step_kind[i] == kStepF32) atomicAdd(static_cast<float*>(table.step[i]), 1.0f);
  else if (table.step_kind[i] == kStepF64) atomicAdd(static_cast<double*>(table.step[i]), 1.0);
}

template <typename A> struct Folded {
  A lr_unused, w1, one_minus_w1, b2, w2, decay, wd, sign, eps, inv_bc2, neg_step;
  bool lerp_low;
};

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) adam_kernel(Table table, Scalars s) {
  using A = acc_t<T>;
  const int ti = table.block_tensor[blockIdx.x];
  const int64_t begin = int64_t(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = table.n[ti];
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;

  __shared__ Folded<A> f;
  if (threadIdx.x == 0) {
    double step = table.host_step[ti];
    if (table.step_kind[ti] == kStepF32) step = double(*static_cast<const float*>(table.step[ti]));
    else if (table.step_kind[ti] == kStepF64) step = *static_cast<const double*>(table.step[ti]);
    // In double, as torch.optim.Adam (Python floats) and the CPU op do, then rounded to A.
    const double bc1 = 1 - pow(s.beta1, step);
    const double bc2 = 1 - pow(s.beta2, step);
    f.w1 = A(1 - s.beta1);
    f.one_minus_w1 = A(1) - f.w1;
    f.b2 = A(s.beta2);
    f.w2 = A(1 - s.beta2);
    f.decay = A(1 - s.lr * s.weight_decay);
    f.wd = A(s.weight_decay);
    f.sign = A(s.maximize ? -1 : 1);
    f.eps = A(s.eps);
    f.inv_bc2 = A(1) / A(sqrt(bc2));  // a multiply by 1/sqrt(bc2) instead of a divide, as the CPU op
    f.neg_step = -A(s.lr / bc1);
    f.lerp_low = f.w1 < A(0.5);       // ATen's lerp switches form at weight 0.5
  }
  __syncthreads();
  const Folded<A> k = f;
  const int wd_mode = s.wd_mode;
  const bool amsgrad = s.amsgrad;

  T* __restrict__ param = static_cast<T*>(table.param[ti]);
  const T* __restrict__ grad = static_cast<const T*>(table.grad[ti]);
  S* __restrict__ exp_avg = static_cast<S*>(table.exp_avg[ti]);
  S* __restrict__ exp_avg_sq = static_cast<S*>(table.exp_avg_sq[ti]);
  S* __restrict__ max_sq = static_cast<S*>(table.max_exp_avg_sq[ti]);

  struct Out { A w, m, v; };
  auto update = [&](A g, A w, A m, A v, A old_max, A& vmax) -> Out {
    g = g * k.sign;
    if (wd_mode == int(WeightDecay::l2)) g = g + k.wd * w;
    if (wd_mode == int(WeightDecay::decoupled)) w = w * k.decay;
    if (k.lerp_low) m = m + k.w1 * (g - m);
    else m = g - (g - m) * k.one_minus_w1;
    v = v * k.b2 + k.w2 * g * g;
    vmax = v;
    if (amsgrad) vmax = (old_max != old_max || old_max > v) ? old_max : v;  // torch.maximum: NaN wins
    const A denom = sqrt(vmax) * k.inv_bc2 + k.eps;
    w = w + k.neg_step * (m / denom);
    return {w, m, v};
  };

  int64_t i = begin;
  if (table.vector_ok[ti]) {  // begin is a multiple of kChunk, hence of kVec
    using VT = Vec<T, kVec>;
    using VS = Vec<S, kVec>;
    const int64_t vend = begin + (end - begin) / kVec * kVec;
    for (int64_t j = begin + int64_t(threadIdx.x) * kVec; j < vend; j += int64_t(kThreads) * kVec) {
      VT pw = *reinterpret_cast<const VT*>(param + j);
      const VT gv = *reinterpret_cast<const VT*>(grad + j);
      VS mv = *reinterpret_cast<const VS*>(exp_avg + j);
      VS vv = *reinterpret_cast<const VS*>(exp_avg_sq + j);
      VS xv;
      if (amsgrad) xv = *reinterpret_cast<const VS*>(max_sq + j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        A vmax;
        auto [w, m, v] = update(to_acc(gv.v[e]), to_acc(pw.v[e]), A(to_acc(mv.v[e])), A(to_acc(vv.v[e])),
                                amsgrad ? A(to_acc(xv.v[e])) : A(0), vmax);
        pw.v[e] = from_acc<T>(w);
        mv.v[e] = store_as<S>(m);
        vv.v[e] = store_as<S>(v);
        if (amsgrad) xv.v[e] = store_as<S>(vmax);
      }
      *reinterpret_cast<VT*>(param + j) = pw;
      *reinterpret_cast<VS*>(exp_avg + j) = mv;
      *reinterpret_cast<VS*>(exp_avg_sq + j) = vv;
      if (amsgrad) *reinterpret_cast<VS*>(max_sq + j) = xv;
    }
    i = vend;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += kThreads) {
    A vmax;
    auto [w, m, v] = update(to_acc(grad[j]), to_acc(param[j]), A(to_acc(exp_avg[j])), A(to_acc(exp_avg_sq[j])),
                            amsgrad ? A(to_acc(max_sq[j])) : A(0), vmax);
    param[j] = from_acc<T>(w);
    exp_avg[j] = store_as<S>(m);
    exp_avg_sq[j] = store_as<S>(v);
    if (amsgrad) max_sq[j] = store_as<S>(vmax);
  }
}

// Every device step incremented before any update reads one: a step tensor shared by params
// that land in different tables then reads the same (final) value in each, as the CPU op and
// torch's _foreach_add_ followed by the update give.
cudaError_t increment_device_steps(const AdamTensor* tensors, int64_t count, cudaStream_t stream) {
  Table table{};
  auto flush = [&]() -> cudaError_t {
    if (table.tensors == 0) return cudaSuccess;
    increment_steps_kernel<<<1, kAdamMaxTensors, 0, stream>>>(table);
    table = Table{};
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    const AdamTensor& t = tensors[i];
    if (!t.step_f32 && !t.step_f64) continue;
    if (table.tensors == kAdamMaxTensors) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int slot = table.tensors++;
    table.step[slot] = t.step_f32 ? static_cast<void*>(t.step_f32) : static_cast<void*>(t.step_f64);
    table.step_kind[slot] = t.step_f32 ? kStepF32 : kStepF64;
  }
  return flush();
}

template <typename T, typename S>
cudaError_t run(const AdamTensor* tensors, int64_t count, const AdamOptions& o, cudaStream_t stream) {
  const Scalars s{o.lr, o.beta1, o.beta2, o.weight_decay, o.eps, int(o.wd_mode), o.amsgrad, o.maximize};
  for (int64_t i = 0; i < count; ++i) {  // checked before anything is launched
    const AdamTensor& t = tensors[i];
    if (t.n > 0 && (!t.param || !t.grad || !t.exp_avg || !t.exp_avg_sq)) return cudaErrorInvalidValue;
    if (t.step_f32 && t.step_f64) return cudaErrorInvalidValue;
    if (ceil_div(t.n, kChunk) > 0x7fffffff) return cudaErrorInvalidValue;
  }
  const cudaError_t incremented = increment_device_steps(tensors, count, stream);
  if (incremented != cudaSuccess) return incremented;
  Table table{};
  int blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (table.tensors == 0) return cudaSuccess;
    if (blocks > 0) {
      adam_kernel<T, S><<<blocks, kThreads, 0, stream>>>(table, s);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    table = Table{};
    blocks = 0;
    return cudaSuccess;
  };
  for (int64_t i = 0; i < count; ++i) {
    const AdamTensor& t = tensors[i];
    const int64_t chunks = ceil_div(t.n, kChunk);
    if (chunks == 0) continue;  // nothing to update (its device step was incremented above)
    const size_t vt = sizeof(T) * kVec, vs = sizeof(S) * kVec;
    for (int64_t c = 0; c < chunks;) {
      if (table.tensors == kAdamMaxTensors) {
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
      }
      const int slot = table.tensors++;
      table.param[slot] = t.param;
      table.grad[slot] = t.grad;
      table.exp_avg[slot] = t.exp_avg;
      table.exp_avg_sq[slot] = t.exp_avg_sq;
      table.max_exp_avg_sq[slot] = t.max_exp_avg_sq;
      table.n[slot] = t.n;
      table.step[slot] = t.step_f32 ? static_cast<void*>(t.step_f32) : static_cast<void*>(t.step_f64);
      table.step_kind[slot] = t.step_f32 ? kStepF32 : t.step_f64 ? kStepF64 : kHostStep;
      table.host_step[slot] = t.host_step;
      table.vector_ok[slot] = aligned(t.param, vt) && aligned(t.grad, vt) && aligned(t.exp_avg, vs) &&
                              aligned(t.exp_avg_sq, vs) && (!o.amsgrad || aligned(t.max_exp_avg_sq, vs));
      for (; c < chunks && blocks < kAdamMaxBlocks; ++c) {
        table.block_tensor[blocks] = static_cast<unsigned char>(slot);
        table.block_chunk[blocks] = static_cast<int>(c);
        ++blocks;
      }
      if (c < chunks) {  // the table is full of blocks: launch it, the tensor continues in the next
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
      }
    }
  }
  return flush();
}

}  // namespace

cudaError_t adam(DType param_dtype, DType state_dtype, const AdamTensor* tensors, int64_t count,
                 const AdamOptions& options, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (state_dtype == param_dtype) {
    return dispatch(param_dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return run<T, T>(tensors, count, options, stream);
    });
  }
  if (state_dtype == DType::f32 && param_dtype == DType::bf16) return run<__nv_bfloat16, float>(tensors, count, options, stream);
  if (state_dtype == DType::f32 && param_dtype == DType::f16) return run<__half, float>(tensors, count, options, stream);
  return cudaErrorNotSupported;
}

}  // namespace aiaas_fast::cuda
