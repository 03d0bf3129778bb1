// The training engine (aiaas_fast/engine.h): a whole step, and whole runs, of K MLPs in C++.
//
// Per step and model: the mini-batch is gathered feature-major into the thread's workspace,
// each layer runs forward on the small kernels or an ATen product, the MSE pass writes
// dL/dz of the last layer, the backward pass writes each layer's weight and bias gradient
// and the input gradient with the ReLU mask of the layer below fused in, and Adam updates
// the model's parameters and state from those gradients. Nothing is allocated per step.
// Models are independent, so K > 1 runs them on the threads in parallel, each thread with
// its own workspace; a single model's wide layers get their threads from the BLAS.
#include "aiaas_fast/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include "ops/adam_scalars.h"
#include "ops/checks.h"
#include "ops/cpu_dispatch.h"

namespace aiaas_fast {
namespace {

constexpr const char* kWho = "aiaas_fast.MLPEngine";
constexpr int64_t kAlign = cpu::kBatchAlign;

// A layer with more weights than this goes to the BLAS; up to it the hand kernels win, as
// they skip the BLAS call and keep the tiles in registers. Measured with
// benchmarks/engine.py --sweep (w->w->w->1, batch 64 to 4096, 2 cores; see the README):
// - AVX-512: the hand kernels lead up to w = 96 at every batch and lose from w = 128 at
//   batch <= 256 (from w = 192 at 1024 and more, by a few percent between);
// - AVX2 (half the vector; two runs): they lead up to w = 64 (1.05x-1.3x up to batch 1024,
//   0.87x at 4096) and lose from w = 96 (0.76x-1.02x).
// The x86-64 baseline copy takes AVX2's point: it was not measured on a CPU with nothing
// better (there the BLAS would be slower too).
int64_t small_max_weights(const char* isa) { return std::string(isa) == "avx512" ? 96 * 128 : 64 * 96; }
// The same for a batch of several chunks, whose lanes each run on one thread: there the BLAS
// gains sooner. AVX2 (w->w->w->1 at batches 2048 and 8192, one run): the hand kernels lead
// at w = 8-16 (1.3x-2.4x), are even at 32 (0.95x-1.12x) and lose from 64 (0.78x-0.83x).
// AVX-512's point is AVX2's scaled as the one-chunk points are (not measured).
int64_t small_max_weights_chunked(const char* isa) { return std::string(isa) == "avx512" ? 64 * 64 : 32 * 64; }
// A single model's predict() of more rows than this runs pieces of this many rows, each
// through every layer on one thread (as a training lane), which the threads take as they free
// up: one parallel region a call instead of one per layer. Pieces of 256, 512 and 1024 rows
// measured against the per-layer split (two runs; 64x4 hidden, 64->256->256->1, the seed
// network at batches 512-65536): 256 led up to 4096 rows and was even with 1024 above.
constexpr int64_t kPredictPiece = 256;

// Models per thread below which K models run on one thread: a parallel region costs tens of
// microseconds on a busy VM, more than a few small steps.
constexpr int64_t kParallelMinMacs = int64_t(1) << 18;

// A small-kernel layer with at least this many multiply-adds splits across the threads.
constexpr int64_t kLayerParallelMinMacs = int64_t(1) << 20;

// An elementwise pass over n elements counts as n * this many multiply-adds when deciding
// whether to split it across the threads: one over 64K elements or more is split.
constexpr int64_t kElementwiseWeight = 16;

// A batch of more columns than this trains in chunks of this many, one after another, with
// the weight gradients added up over the chunks: a chunk's activations and gradients stay in
// the caches, where a whole large batch's went out to memory between layers (a 64-wide MLP at
// batch 65536 ran 4x slower than eager PyTorch). The bits of a step depend on the batch
// (where its chunks end), never on the threads.
constexpr int64_t kChunkCols = 1024;

// The chunks of a batch fall into up to this many lanes, contiguous runs of chunks whose
// weight gradients are summed apart and then added in lane order: the threads take lanes as
// they free up, and the sums depend on the batch alone, never on the threads. Each lane
// keeps a copy of the gradients, at most kLaneBytes of them in all (fewer lanes for a large
// model).
constexpr int64_t kMaxLanes = 32;
constexpr int64_t kLaneBytes = int64_t(64) << 20;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// splitmix64: a small, fast generator with a fixed sequence for a seed, so a run's batches
// depend only on (seed, model), never on threads.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return uint64_t((static_cast<unsigned __int128>(next()) * n) >> 64); }
};

struct Workspace {
  int64_t ld = 0;
  at::Tensor storage;
  at::Tensor lanes;  // (lanes, gradient floats): a chunked batch's per-lane weight gradients
  bool chunked = false;  // the batch in work is one of several chunks: picks the kernel path
  std::vector<float*> act;  // act[0]: the input (in x ld); act[l + 1]: the output of layer l
  float* target = nullptr;  // (out x ld)
  float* grad[2] = {nullptr, nullptr};  // dL/dz of the current and the next layer down
  std::vector<float*> dw, db;
};

at::Tensor blob(float* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

struct MLPEngine::Impl {
  std::vector<EngineLayer> layers;
  EngineOptimizerState state;
  AdamOptions opt;
  std::string path;
  int64_t K = 1, L = 0;
  std::vector<int64_t> width;  // width[0] = in; width[l + 1] = out of layer l
  struct Param {
    at::Tensor tensor;
    int64_t per_model;
    int64_t layer;
    bool is_bias;
    // Raw pointers to it and its state, taken once: the tensors are held (checked unchanged
    // at every call) and data_ptr<float>()'s type check cost ~2% of a small step.
    float *data = nullptr, *exp_avg = nullptr, *exp_avg_sq = nullptr, *max_exp_avg_sq = nullptr, *steps = nullptr;
  };
  std::vector<Param> params;
  // Every tensor the kernels write through a raw pointer (parameters, Adam state), with the
  // address and shape checked at construction: a tensor resized or given new storage since
  // (param.data = ..., resize_, set_) is refused instead of written out of bounds.
  struct Held {
    at::Tensor tensor;
    std::string name;
    const void* ptr;
    std::vector<int64_t> sizes;
  };
  std::vector<Held> held;
  std::vector<Workspace> ws;  // per thread
  std::vector<Workspace> pieces_ws;  // per thread, for predict's pieces (a step's stay as they are)
  // One call at a time per engine (the binding drops the GIL); recursive so that a run's
  // callback may call step() or predict() between segments.
  mutable std::recursive_mutex busy;
  const cpu::MlpKernels& mk = cpu_mlp_kernels();
  const cpu::Kernels<float>& kf = cpu_kernel_set().f32;
  const int64_t small_max = small_max_weights(cpu_kernel_set().isa);
  const int64_t small_max_chunked = small_max_weights_chunked(cpu_kernel_set().isa);

  // Layer l on the BLAS? chunked: a batch of several chunks (each lane on one thread).
  bool blas(int64_t l, bool chunked) const {
    if (path == "small") return false;
    if (path == "blas") return true;
    return width[l] * width[l + 1] > (chunked ? small_max_chunked : small_max);
  }
  int64_t macs_per_step(int64_t ld) const {
    int64_t m = 0;
    for (int64_t l = 0; l < L; ++l) m += 3 * width[l] * width[l + 1] * ld;
    return m;
  }

  void allocate(Workspace& w, int64_t ld) const {
    int64_t total = 0, maxw = 0;
    for (int64_t v : width) total += v * ld, maxw = std::max(maxw, v);
    total += width[L] * ld + 2 * maxw * ld;
    for (int64_t l = 0; l < L; ++l) total += round_up(width[l] * width[l + 1], kAlign) + round_up(width[l + 1], kAlign);
    w.ld = ld;
    // ATen's CPU allocator aligns to 64 bytes, and every piece below starts at a multiple of
    // 16 floats, so each row of each buffer is 64-byte aligned.
    w.storage = at::zeros({total}, at::kFloat);
    float* p = w.storage.data_ptr<float>();
    auto take = [&](int64_t n) { float* r = p; p += round_up(n, kAlign); return r; };
    w.act.assign(L + 1, nullptr);
    for (int64_t l = 0; l <= L; ++l) w.act[l] = take(width[l] * ld);
    w.target = take(width[L] * ld);
    w.grad[0] = take(maxw * ld);
    w.grad[1] = take(maxw * ld);
    w.dw.assign(L, nullptr);
    w.db.assign(L, nullptr);
    for (int64_t l = 0; l < L; ++l) {
      w.dw[l] = take(width[l] * width[l + 1]);
      w.db[l] = take(width[l + 1]);
    }
  }

  // Workspaces for `threads` threads whose rows hold a chunk of `batch` columns. A smaller
  // batch reuses larger buffers (zero padding costs less than reallocating for a last partial
  // batch) unless they are more than twice too wide.
  void ensure(int64_t batch, int64_t threads) { ensure(ws, batch, threads); }
  void ensure(std::vector<Workspace>& ws, int64_t batch, int64_t threads) const {
    int64_t ld = round_up(std::clamp<int64_t>(batch, 1, kChunkCols), kAlign);
    // Rows 4 KiB apart land in the same cache sets, and a tile reads a column of up to 64+
    // rows at once: one cache line more per row spreads them (at batch 65536 in chunks of
    // 1024, 1.6x faster in three interleaved runs). Not at 512 and less, where six alternated
    // runs of 64->256->256->1 at batch 512 put the padding at 0.93x (within the spread).
    if (ld == kChunkCols) ld += kAlign;
    if (static_cast<int64_t>(ws.size()) < threads) ws.resize(threads);
    for (int64_t t = 0; t < threads; ++t)
      if (ws[t].ld < ld || ws[t].ld > 2 * ld) allocate(ws[t], ld);
  }

  float* weight_ptr(int64_t l, int64_t k) const {
    return layers[l].weight.data_ptr<float>() + k * width[l] * width[l + 1];
  }
  float* bias_ptr(int64_t l, int64_t k) const {
    return layers[l].bias.defined() ? layers[l].bias.data_ptr<float>() + k * width[l + 1] : nullptr;
  }

  // f(u0, u1) over [0, units), split across the threads when a layer's work is worth a
  // parallel region and no outer region (models in parallel) already holds the threads.
  template <typename F>
  static void split(int64_t units, int64_t macs, const F& f) {
    if (macs < kLayerParallelMinMacs || units < 2 || at::in_parallel_region() || at::get_num_threads() < 2)
      return f(int64_t(0), units);
    at::parallel_for(0, units, 1, f);
  }

  void forward(Workspace& w, int64_t k) const {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t in = width[l], out = width[l + 1];
      if (blas(l, w.chunked)) {
        float* z = w.act[l + 1];
        at::Tensor zt = blob(z, out, w.ld);
        at::mm_out(zt, blob(weight_ptr(l, k), out, in), blob(w.act[l], in, w.ld));
        const float* bp = bias_ptr(l, k);
        const bool relu = layers[l].relu;
        split(out, out * w.ld * kElementwiseWeight, [&](int64_t r0, int64_t r1) {
          mk.bias_act(z + r0 * w.ld, bp ? bp + r0 : nullptr, r1 - r0, w.ld, relu);
        });
      } else {
        const float *wp = weight_ptr(l, k), *bp = bias_ptr(l, k), *a = w.act[l];
        float* z = w.act[l + 1];
        const bool relu = layers[l].relu;
        split(w.ld / kAlign, in * out * w.ld, [&](int64_t c0, int64_t c1) {
          mk.dense_forward(wp, bp, a + c0 * kAlign, z + c0 * kAlign, in, out, w.ld, (c1 - c0) * kAlign, relu);
        });
      }
    }
  }

  // Backward from the loss gradient in w.grad[0]. The weight gradients are left in w.dw /
  // w.db (read by Adam and last_gradients()); with add, added to what is there (a later chunk).
  void backward(Workspace& w, int64_t k, bool add) const {
    int cur = 0;
    if (layers[L - 1].relu) mk.relu_mask(w.grad[0], w.act[L], width[L], w.ld);
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t in = width[l], out = width[l + 1];
      float* g = w.grad[cur];
      const bool use_blas = blas(l, w.chunked);
      if (use_blas) {
        at::Tensor dw = blob(w.dw[l], out, in);
        if (add)
          dw.addmm_(blob(g, out, w.ld), blob(w.act[l], in, w.ld).t());
        else
          at::mm_out(dw, blob(g, out, w.ld), blob(w.act[l], in, w.ld).t());
        if (layers[l].bias.defined()) {
          float* db = w.db[l];
          split(out, out * w.ld * kElementwiseWeight, [&](int64_t r0, int64_t r1) {
            mk.row_sums(g + r0 * w.ld, db + r0, r1 - r0, w.ld, add);
          });
        }
      } else {
        const float* a = w.act[l];
        float *dw = w.dw[l], *db = layers[l].bias.defined() ? w.db[l] : nullptr;
        split(out, in * out * w.ld, [&](int64_t o0, int64_t o1) {
          mk.dense_grad_weight(g + o0 * w.ld, a, dw + o0 * in, db ? db + o0 : nullptr, in, o1 - o0, w.ld, add);
        });
      }
      if (l == 0) break;
      float* ga = w.grad[cur ^ 1];
      const float* mask = layers[l - 1].relu ? w.act[l] : nullptr;
      if (use_blas) {
        at::Tensor gat = blob(ga, in, w.ld);
        at::mm_out(gat, blob(weight_ptr(l, k), out, in).t(), blob(g, out, w.ld));
        if (mask)
          split(in, in * w.ld * kElementwiseWeight, [&](int64_t r0, int64_t r1) {
            mk.relu_mask(ga + r0 * w.ld, mask + r0 * w.ld, r1 - r0, w.ld);
          });
      } else {
        const float* wp = weight_ptr(l, k);
        split(w.ld / kAlign, in * out * w.ld, [&](int64_t c0, int64_t c1) {
          const int64_t j0 = c0 * kAlign;
          mk.dense_grad_input(wp, g + j0, mask ? mask + j0 : nullptr, ga + j0, in, out, w.ld, (c1 - c0) * kAlign);
        });
      }
      cur ^= 1;
    }
  }

  void adam(Workspace& w, int64_t k) const {
    // The scalars depend on the step count only (two pow() calls): folded again only where a
    // parameter's count differs from the previous one's, as it rarely does.
    double scalars_step = -1;
    cpu::AdamScalars<float> scalars{};
    for (const Param& P : params) {
      const int64_t n = P.per_model, off = k * n;
      const double step = P.steps[k] += 1.0f;
      const cpu::AdamTensor<float> view{P.data + off, P.is_bias ? w.db[P.layer] : w.dw[P.layer], P.exp_avg + off,
                                        P.exp_avg_sq + off, opt.amsgrad ? P.max_exp_avg_sq + off : nullptr};
      if (step != scalars_step) scalars = adam_scalars<float>(opt, step), scalars_step = step;
      split(n, n * kElementwiseWeight, [&](int64_t i0, int64_t i1) { kf.adam(view, scalars, i0, i1); });
    }
  }

  // One training step of model k on `batch` rows, in workspace w; returns the loss.
  // gather(ws, r0, n) puts rows [r0, r0 + n) of the batch into ws.act[0] / ws.target, a chunk
  // of at most kChunkCols.
  template <typename Gather>
  double train_step(Workspace& w, int64_t k, int64_t batch, const Gather& gather) {
    const int64_t out = width[L];
    const double denom = double(batch) * double(out);
    const float scale = float(2.0 / denom);
    const int64_t chunks = (batch + kChunkCols - 1) / kChunkCols;
    double sse = 0;
    if (chunks == 1) {
      w.chunked = false;
      gather(w, int64_t(0), batch);
      forward(w, k);
      sse = mk.mse_grad(w.act[L], w.target, w.grad[0], out, batch, w.ld, scale);
      backward(w, k, false);
    } else {
      sse = chunked_gradients(w, k, batch, chunks, scale, gather);
    }
    adam(w, k);
    return sse / denom;
  }

  // fn(workspace, i) for i in [0, n) on `threads` threads, each taking the next i as it frees
  // up, in its own workspace of wss.
  template <typename F>
  static void take_turns(std::vector<Workspace>& wss, int64_t threads, int64_t n, const F& fn) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      Workspace& w = wss[at::get_thread_num()];
      for (int64_t i; (i = next.fetch_add(1)) < n;) fn(w, i);
    });
  }

  // The weight gradients of a batch of several chunks into w.dw / w.db, lane by lane (see
  // kMaxLanes); returns the sum of squared errors. The lanes run on the threads when
  // for_models gave each thread a workspace (one model at a time), else one after another.
  template <typename Gather>
  double chunked_gradients(Workspace& w, int64_t k, int64_t batch, int64_t chunks, float scale, const Gather& gather) {
    float* grads = w.dw[0];  // dw and db of every layer lie together at the end of the storage
    const int64_t size = w.storage.data_ptr<float>() + w.storage.numel() - grads;
    const int64_t lanes = std::clamp<int64_t>(kLaneBytes / (size * int64_t(sizeof(float))), 1,
                                              std::min(chunks, kMaxLanes));
    if (!w.lanes.defined() || w.lanes.numel() < lanes * size) w.lanes = at::empty({lanes * size}, at::kFloat);
    float* lane_grads = w.lanes.data_ptr<float>();
    std::vector<double> sse(lanes);
    const int64_t out = width[L];
    auto run_lane = [&](Workspace& lw, int64_t g) {
      const int64_t c0 = g * chunks / lanes, c1 = (g + 1) * chunks / lanes;
      double s = 0;
      lw.chunked = true;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * kChunkCols, n = std::min(kChunkCols, batch - r0);
        gather(lw, r0, n);
        forward(lw, k);
        s += mk.mse_grad(lw.act[L], lw.target, lw.grad[0], out, n, lw.ld, scale);
        backward(lw, k, c > c0);
      }
      sse[g] = s;
      std::memcpy(lane_grads + g * size, lw.dw[0], size * sizeof(float));
    };
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(ws.size()));
    if (threads > 1 && lanes > 1 && !at::in_parallel_region() && &w == &ws[0]) {
      take_turns(ws, threads, lanes, run_lane);
    } else {
      for (int64_t g = 0; g < lanes; ++g) run_lane(w, g);
    }
    split(size, size * lanes, [&](int64_t i0, int64_t i1) {
      std::memcpy(grads + i0, lane_grads + i0, (i1 - i0) * sizeof(float));
      for (int64_t g = 1; g < lanes; ++g)
        for (int64_t i = i0; i < i1; ++i) grads[i] += lane_grads[g * size + i];
    });
    double total = 0;
    for (double s : sse) total += s;
    return total;
  }

  // fn(workspace, k0, k1) over the models, on the threads when the work pays for a region.
  // Each thread takes the next few models as it frees up, not a fixed share: models may
  // have very different numbers of rows (one per plant unit), and a VM's threads do not all
  // run at one speed. A model's results do not depend on the thread that runs it.
  template <typename F>
  void for_models(int64_t ld, const F& fn) {
    const int64_t threads = at::get_num_threads();
    const bool parallel = K > 1 && threads > 1 && !at::in_parallel_region() &&
                          macs_per_step(ld) * K >= kParallelMinMacs * threads;
    // One model at a time on a batch of several chunks: a workspace per thread for its lanes.
    const bool lanes = !parallel && ld > kChunkCols && threads > 1 && !at::in_parallel_region();
    ensure(ld, parallel || lanes ? threads : 1);
    if (!parallel) return fn(ws[0], int64_t(0), K);
    const int64_t chunk = std::max<int64_t>(1, K / (threads * 8));  // fn gathers a shared batch once per call
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      Workspace& w = ws[at::get_thread_num()];
      for (int64_t k0; (k0 = next.fetch_add(chunk)) < K;) fn(w, k0, std::min(K, k0 + chunk));
    });
  }

  void hold(const at::Tensor& t, std::string name) {
    held.push_back({t, std::move(name), t.data_ptr(), t.sizes().vec()});
  }

  void check_unchanged(const char* call) const {
    for (const Held& h : held)
      TORCH_CHECK(h.tensor.data_ptr() == h.ptr && h.tensor.sizes() == at::IntArrayRef(h.sizes) &&
                      h.tensor.scalar_type() == at::kFloat && h.tensor.is_contiguous(),
                  kWho, ".", call, ": ", h.name, " was resized or given other storage after the engine was built (now ",
                  h.tensor.sizes(), " ", h.tensor.scalar_type(), ", was ", at::IntArrayRef(h.sizes),
                  " float32; e.g. param.data = ...); build a new engine for the model");
  }

  // No two tensors the engine writes may share memory: a weight used by two layers, a state
  // tensor that is its parameter, one step counter for several parameters would each be
  // updated twice per step.
  void check_no_overlap() const {
    std::vector<std::pair<const char*, size_t>> spans;  // (start, index into held)
    for (size_t i = 0; i < held.size(); ++i)
      if (held[i].tensor.numel() > 0) spans.emplace_back(static_cast<const char*>(held[i].ptr), i);
    std::sort(spans.begin(), spans.end());
    for (size_t j = 1; j < spans.size(); ++j) {
      const Held& a = held[spans[j - 1].second];
      const Held& b = held[spans[j].second];
      const char* a_end = spans[j - 1].first + a.tensor.numel() * a.tensor.element_size();
      TORCH_CHECK(spans[j].first >= a_end, kWho, ": ", a.name, " and ", b.name,
                  " share memory; every parameter and state tensor must have its own");
    }
  }

  // Tells autograd the tensors changed when a call ends in an exception after updating them
  // (the normal return bumps them itself).
  struct BumpOnError {
    const Impl& impl;
    const int uncaught = std::uncaught_exceptions();
    ~BumpOnError() {
      if (std::uncaught_exceptions() <= uncaught) return;
      try {
        impl.bump_versions();
      } catch (...) {  // an inference tensor has no version counter: nothing to tell autograd
      }
    }
  };

  void bump_versions() const {
    for (const Param& P : params) torch::autograd::impl::bump_version(P.tensor);
    for (auto* list : {&state.exp_avgs, &state.exp_avg_sqs, &state.max_exp_avg_sqs, &state.steps})
      for (const at::Tensor& t : *list) torch::autograd::impl::bump_version(t);
  }

  // t as (rows, cols), or (K, rows, cols) where allowed, float32 and contiguous; or a clear
  // error naming the argument. A 1-D target is one column.
  at::Tensor matrix(const at::Tensor& t, const char* name, int64_t cols, bool allow_models) const {
    TORCH_CHECK(t.defined(), kWho, ": ", name, " is missing");
    TORCH_CHECK(t.device().is_cpu(), kWho, ": ", name, " must be on the CPU (the engine's device), got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, kWho, ": ", name, " must be float32, got ", t.scalar_type());
    at::Tensor m = (t.dim() == 1 && cols == 1) ? t.unsqueeze(1) : t;
    TORCH_CHECK(m.dim() == 2 || (allow_models && m.dim() == 3), kWho, ": ", name, " must be ",
                allow_models ? "(batch, features) or (models, batch, features)" : "(rows, features)",
                ", got shape ", t.sizes());
    TORCH_CHECK(m.size(-1) == cols, kWho, ": ", name, " has ", m.size(-1), " columns (shape ", t.sizes(),
                ") but the model ", name[0] == 'x' ? "takes " : "gives ", cols);
    TORCH_CHECK(m.dim() == 2 || m.size(0) == K, kWho, ": ", name, " holds ", m.size(0),
                " models in dim 0 (shape ", t.sizes(), ") but the engine trains ", K);
    return m.contiguous();
  }
};

MLPEngine::MLPEngine(std::vector<EngineLayer> layers, EngineOptimizerState state, AdamOptions options,
                     std::string path)
    : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  TORCH_CHECK(path == "auto" || path == "small" || path == "blas", kWho, ": path must be 'auto', 'small' or 'blas', got '",
              path, "'");
  TORCH_CHECK(!layers.empty(), kWho, ": the model has no layers");
  const at::Tensor& w0 = layers[0].weight;
  TORCH_CHECK(w0.defined() && (w0.dim() == 2 || w0.dim() == 3), kWho,
              ": layer 0 weight must be (out, in) or (models, out, in), got ",
              w0.defined() ? c10::str(w0.sizes()) : std::string("none"));
  const bool stacked = w0.dim() == 3;
  I.K = stacked ? w0.size(0) : 1;
  I.L = static_cast<int64_t>(layers.size());
  TORCH_CHECK(I.K >= 1, kWho, ": no models (weight shape ", w0.sizes(), ")");
  I.width.push_back(w0.size(-1));
  for (int64_t l = 0; l < I.L; ++l) {
    const at::Tensor& w = layers[l].weight;
    const at::Tensor& b = layers[l].bias;
    const std::string name = "layer " + std::to_string(l);
    TORCH_CHECK(w.defined() && w.dim() == (stacked ? 3 : 2), kWho, ": ", name, " weight must be ",
                stacked ? "(models, out, in)" : "(out, in)", ", got ", w.defined() ? c10::str(w.sizes()) : "none");
    TORCH_CHECK(w.device().is_cpu(), kWho, ": ", name, " weight is on ", w.device(),
                "; the compiled engine runs on the CPU (use the op-by-op path on other devices)");
    TORCH_CHECK(w.scalar_type() == at::kFloat, kWho, ": ", name, " weight must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.is_contiguous(), kWho, ": ", name, " weight must be contiguous");
    TORCH_CHECK(!stacked || w.size(0) == I.K, kWho, ": ", name, " weight holds ", w.size(0), " models, layer 0 holds ", I.K);
    TORCH_CHECK(w.size(-1) == I.width.back(), kWho, ": ", name, " takes ", w.size(-1), " features but layer ", l - 1,
                " gives ", I.width.back());
    TORCH_CHECK(w.size(-2) >= 1 && w.size(-1) >= 1, kWho, ": ", name, " weight has an empty dimension ", w.sizes());
    I.width.push_back(w.size(-2));
    if (b.defined()) {
      TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.is_contiguous(), kWho, ": ", name,
                  " bias must be a contiguous float32 CPU tensor");
      const bool ok = stacked ? (b.dim() == 2 && b.size(0) == I.K && b.size(1) == w.size(1))
                              : (b.dim() == 1 && b.size(0) == w.size(0));
      TORCH_CHECK(ok, kWho, ": ", name, " bias must have shape ", stacked ? "(models, out) = " : "(out) = ",
                  stacked ? c10::str(at::IntArrayRef{I.K, w.size(1)}) : c10::str(at::IntArrayRef{w.size(0)}),
                  ", got ", b.sizes());
    }
    I.params.push_back({w, w.numel() / I.K, l, false});
    if (b.defined()) I.params.push_back({b, b.numel() / I.K, l, true});
  }
  const size_t np = I.params.size();
  auto check_list = [&](const std::vector<at::Tensor>& list, const char* what) {
    TORCH_CHECK(list.size() == np, kWho, ": ", what, " has ", list.size(), " tensors for ", np, " parameters");
    for (size_t p = 0; p < np; ++p) {
      const at::Tensor& t = list[p];
      TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                      t.sizes() == I.params[p].tensor.sizes(),
                  kWho, ": ", what, "[", p, "] must be a contiguous float32 CPU tensor of shape ",
                  I.params[p].tensor.sizes(), ", got ",
                  t.defined() ? c10::str(t.sizes(), " ", t.scalar_type(), " on ", t.device()) : "none");
    }
  };
  check_list(state.exp_avgs, "exp_avgs");
  check_list(state.exp_avg_sqs, "exp_avg_sqs");
  const bool has_max = options.amsgrad || !state.max_exp_avg_sqs.empty();  // given: checked, so amsgrad may turn on later
  if (has_max) check_list(state.max_exp_avg_sqs, "max_exp_avg_sqs");
  TORCH_CHECK(state.steps.size() == np, kWho, ": steps has ", state.steps.size(), " tensors for ", np, " parameters");
  for (size_t p = 0; p < np; ++p) {
    const at::Tensor& s = state.steps[p];
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                    s.numel() == I.K,
                kWho, ": steps[", p, "] must be a float32 CPU tensor of ", I.K, " element(s)");
  }
  for (size_t p = 0; p < np; ++p) {
    const Impl::Param& P = I.params[p];
    const std::string what = "layer " + std::to_string(P.layer) + (P.is_bias ? " bias" : " weight");
    I.hold(P.tensor, what);
    I.hold(state.exp_avgs[p], "exp_avgs[" + std::to_string(p) + "] (" + what + ")");
    I.hold(state.exp_avg_sqs[p], "exp_avg_sqs[" + std::to_string(p) + "] (" + what + ")");
    if (has_max) I.hold(state.max_exp_avg_sqs[p], "max_exp_avg_sqs[" + std::to_string(p) + "] (" + what + ")");
    I.hold(state.steps[p], "steps[" + std::to_string(p) + "] (" + what + ")");
  }
  I.check_no_overlap();
  I.layers = std::move(layers);
  I.state = std::move(state);
  for (size_t p = 0; p < np; ++p) {
    Impl::Param& P = I.params[p];
    P.data = P.tensor.data_ptr<float>();
    P.exp_avg = I.state.exp_avgs[p].data_ptr<float>();
    P.exp_avg_sq = I.state.exp_avg_sqs[p].data_ptr<float>();
    if (has_max) P.max_exp_avg_sq = I.state.max_exp_avg_sqs[p].data_ptr<float>();
    P.steps = I.state.steps[p].data_ptr<float>();
  }
  I.path = std::move(path);
  set_options(options);
}

MLPEngine::~MLPEngine() = default;

int64_t MLPEngine::num_models() const { return impl_->K; }
int64_t MLPEngine::in_features() const { return impl_->width.front(); }
int64_t MLPEngine::out_features() const { return impl_->width.back(); }
AdamOptions MLPEngine::options() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->busy);
  return impl_->opt;
}

void MLPEngine::set_options(const AdamOptions& o) {
  std::lock_guard<std::recursive_mutex> lock(impl_->busy);
  checks::adam_hyperparameters(o.lr, o.beta1, o.beta2, o.weight_decay, o.eps);
  TORCH_CHECK(!o.amsgrad || impl_->state.max_exp_avg_sqs.size() == impl_->params.size(), kWho,
              ": amsgrad needs max_exp_avg_sqs for every parameter");
  impl_->opt = o;
}

std::vector<std::string> MLPEngine::layer_paths(int64_t batch_size) const {
  std::vector<std::string> r;
  for (int64_t l = 0; l < impl_->L; ++l) r.push_back(impl_->blas(l, batch_size > kChunkCols) ? "blas" : "small");
  return r;
}

at::Tensor MLPEngine::step(const at::Tensor& x_in, const at::Tensor& y_in) {
  Impl& I = *impl_;
  std::lock_guard<std::recursive_mutex> lock(I.busy);
  I.check_unchanged("step");
  at::Tensor x = I.matrix(x_in, "x", I.width.front(), true);
  at::Tensor y = I.matrix(y_in, "y", I.width.back(), true);
  const int64_t batch = x.size(-2);
  TORCH_CHECK(batch >= 1, kWho, ".step: x has no rows");
  TORCH_CHECK(y.size(-2) == batch, kWho, ".step: x has ", batch, " rows but y has ", y.size(-2));
  const int64_t in = I.width.front(), out = I.width.back();
  const bool x_per_model = x.dim() == 3, y_per_model = y.dim() == 3;
  at::Tensor losses = at::empty({I.K}, at::kDouble);
  double* loss = losses.data_ptr<double>();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const Impl::BumpOnError bump_on_error{I};  // some models may have been updated before an error
  const bool one_chunk = batch <= kChunkCols;  // then a shared batch is gathered once per thread
  I.for_models(batch, [&](Workspace& w, int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const float* xk = xp + (x_per_model ? k * batch * in : 0);
      const float* yk = yp + (y_per_model ? k * batch * out : 0);
      loss[k] = I.train_step(w, k, batch, [&](Workspace& lw, int64_t r0, int64_t n) {
        if (k == k0 || x_per_model || !one_chunk) I.mk.gather_transpose(xk + r0 * in, in, nullptr, n, in, lw.act[0], lw.ld);
        if (k == k0 || y_per_model || !one_chunk) I.mk.gather_transpose(yk + r0 * out, out, nullptr, n, out, lw.target, lw.ld);
      });
    }
  });
  I.bump_versions();
  return losses;
}

at::Tensor MLPEngine::run(const at::Tensor& x_in, const at::Tensor& y_in, const RunOptions& o,
                          const at::Tensor& sample_index, const at::Tensor& sample_offsets, const RunCallback& callback) {
  Impl& I = *impl_;
  std::lock_guard<std::recursive_mutex> lock(I.busy);
  I.check_unchanged("run");
  at::Tensor x = I.matrix(x_in, "x", I.width.front(), false);
  at::Tensor y = I.matrix(y_in, "y", I.width.back(), false);
  const int64_t n = x.size(0), in = I.width.front(), out = I.width.back();
  TORCH_CHECK(y.size(0) == n, kWho, ".run: x has ", n, " rows but y has ", y.size(0));
  TORCH_CHECK(o.epochs >= 0, kWho, ".run: epochs must be >= 0, got ", o.epochs);
  TORCH_CHECK(o.batch_size >= 1, kWho, ".run: batch_size must be >= 1, got ", o.batch_size);
  TORCH_CHECK(o.callback_every >= 0, kWho, ".run: callback_every must be >= 0, got ", o.callback_every);

  // Each model's rows, as a list it shuffles in place.
  std::vector<std::vector<int64_t>> rows(I.K);
  if (sample_index.defined()) {
    TORCH_CHECK(sample_index.dim() == 1 && sample_index.scalar_type() == at::kLong && sample_index.device().is_cpu(),
                kWho, ".run: sample_index must be a 1-D int64 CPU tensor");
    TORCH_CHECK(sample_offsets.defined() && sample_offsets.dim() == 1 && sample_offsets.scalar_type() == at::kLong &&
                    sample_offsets.numel() == I.K + 1,
                kWho, ".run: sample_offsets must be a 1-D int64 tensor of ", I.K + 1, " elements (models + 1)");
    at::Tensor idx = sample_index.contiguous(), offs = sample_offsets.contiguous();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const int64_t* op = offs.data_ptr<int64_t>();
    TORCH_CHECK(op[0] == 0 && op[I.K] == idx.numel(), kWho, ".run: sample_offsets must start at 0 and end at ",
                idx.numel(), " (the length of sample_index)");
    for (int64_t k = 0; k < I.K; ++k) {
      TORCH_CHECK(op[k + 1] > op[k], kWho, ".run: model ", k, " has no rows (sample_offsets[", k, "] = ", op[k],
                  ", sample_offsets[", k + 1, "] = ", op[k + 1], ")");
      rows[k].assign(ip + op[k], ip + op[k + 1]);
      for (int64_t r : rows[k])
        TORCH_CHECK(r >= 0 && r < n, kWho, ".run: sample_index holds row ", r, " for model ", k, ", but x has ", n,
                    " rows");
    }
  } else {
    TORCH_CHECK(n >= 1, kWho, ".run: x has no rows");
    for (auto& r : rows) {
      r.resize(n);
      std::iota(r.begin(), r.end(), int64_t(0));
    }
  }
  // A batch larger than every model's rows is one batch of all of them (as a DataLoader's):
  // the buffers are sized by the rows, not by the number asked for.
  int64_t most_rows = 0;
  for (const auto& r : rows) most_rows = std::max<int64_t>(most_rows, static_cast<int64_t>(r.size()));
  const int64_t B = std::min(o.batch_size, most_rows);
  int64_t steps_in_epoch = 0;
  std::vector<int64_t> nb(I.K);
  for (int64_t k = 0; k < I.K; ++k) {
    nb[k] = (static_cast<int64_t>(rows[k].size()) + B - 1) / B;
    steps_in_epoch = std::max(steps_in_epoch, nb[k]);
  }
  std::vector<Rng> rng(I.K);
  for (int64_t k = 0; k < I.K; ++k) rng[k].s = o.seed * 0xD1B54A32D192ED03ull + uint64_t(k) * 0x9E3779B97F4A7C15ull;

  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  std::vector<double> loss_sum(I.K), rows_seen(I.K);
  at::Tensor result = at::full({o.epochs, I.K}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
  double* res = result.data_ptr<double>();
  int64_t epochs_run = 0;
  bool stop = false;
  // A callback that throws (or a kernel error): the steps before it have updated the tensors.
  const Impl::BumpOnError bump_on_error{I};
  for (int64_t e = 0; e < o.epochs && !stop; ++e) {
    std::fill(loss_sum.begin(), loss_sum.end(), 0.0);
    std::fill(rows_seen.begin(), rows_seen.end(), 0.0);
    int64_t s0 = 0;
    while (s0 < steps_in_epoch) {
      const int64_t s1 = o.callback_every > 0 ? std::min(steps_in_epoch, s0 + o.callback_every) : steps_in_epoch;
      I.for_models(B, [&](Workspace& w, int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          std::vector<int64_t>& r = rows[k];
          const int64_t nk = static_cast<int64_t>(r.size());
          if (s0 == 0 && o.shuffle)  // Fisher-Yates
            for (int64_t i = nk - 1; i > 0; --i) std::swap(r[i], r[rng[k].below(uint64_t(i + 1))]);
          for (int64_t s = s0; s < std::min(s1, nb[k]); ++s) {
            const int64_t b0 = s * B, bn = std::min(B, nk - b0);
            loss_sum[k] += I.train_step(w, k, bn, [&](Workspace& lw, int64_t r0, int64_t n) {
              I.mk.gather_transpose(xp, in, r.data() + b0 + r0, n, in, lw.act[0], lw.ld);
              I.mk.gather_transpose(yp, out, r.data() + b0 + r0, n, out, lw.target, lw.ld);
            }) * double(bn);
            rows_seen[k] += double(bn);
          }
        }
      });
      s0 = s1;
      if (callback) {
        RunProgress p{e, s1, steps_in_epoch, s1 == steps_in_epoch, std::vector<double>(I.K)};
        for (int64_t k = 0; k < I.K; ++k) p.losses[k] = rows_seen[k] > 0 ? loss_sum[k] / rows_seen[k] : NAN;
        if (callback(p)) {
          stop = true;
          if (s1 < steps_in_epoch) break;
        }
      }
    }
    for (int64_t k = 0; k < I.K; ++k) res[e * I.K + k] = rows_seen[k] > 0 ? loss_sum[k] / rows_seen[k] : NAN;
    ++epochs_run;
  }
  I.bump_versions();
  return result.narrow(0, 0, epochs_run);
}

at::Tensor MLPEngine::predict(const at::Tensor& x_in) {
  Impl& I = *impl_;
  std::lock_guard<std::recursive_mutex> lock(I.busy);
  I.check_unchanged("predict");
  at::Tensor x = I.matrix(x_in, "x", I.width.front(), false);
  const int64_t n = x.size(0), in = I.width.front(), out = I.width.back();
  at::Tensor result = at::empty({I.K, n, out}, at::kFloat);
  if (n == 0) return result;
  const int64_t chunk = std::min<int64_t>(n, kChunkCols);
  const float* xp = x.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  if (I.K == 1 && n > kPredictPiece) {  // see kPredictPiece; the bits depend on n alone
    const int64_t pieces = (n + kPredictPiece - 1) / kPredictPiece;
    const bool parallel = at::get_num_threads() > 1 && !at::in_parallel_region() &&
                          I.macs_per_step(n) / 3 >= kParallelMinMacs * at::get_num_threads();
    const int64_t threads = parallel ? std::min<int64_t>(at::get_num_threads(), pieces) : 1;
    I.ensure(I.pieces_ws, kPredictPiece, threads);
    auto run_piece = [&](Workspace& w, int64_t p) {
      w.chunked = true;  // one thread per piece: the lanes' kernel path
      const int64_t r0 = p * kPredictPiece, bn = std::min(kPredictPiece, n - r0);
      I.mk.gather_transpose(xp + r0 * in, in, nullptr, bn, in, w.act[0], w.ld);
      I.forward(w, 0);
      I.mk.transpose_out(w.act[I.L], w.ld, bn, out, rp + r0 * out);
    };
    if (threads == 1) {
      for (int64_t p = 0; p < pieces; ++p) run_piece(I.pieces_ws[0], p);
    } else {
      Impl::take_turns(I.pieces_ws, threads, pieces, run_piece);
    }
    return result;
  }
  I.for_models(chunk, [&](Workspace& w, int64_t k0, int64_t k1) {
    w.chunked = false;  // each chunk's layers split across the threads, as a one-chunk batch's
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t bn = std::min(chunk, n - r0);
      I.mk.gather_transpose(xp + r0 * in, in, nullptr, bn, in, w.act[0], w.ld);
      for (int64_t k = k0; k < k1; ++k) {
        I.forward(w, k);
        I.mk.transpose_out(w.act[I.L], w.ld, bn, out, rp + (k * n + r0) * out);
      }
    }
  });
  return result;
}

std::vector<at::Tensor> MLPEngine::last_gradients() const {
  const Impl& I = *impl_;
  std::lock_guard<std::recursive_mutex> lock(I.busy);
  TORCH_CHECK(I.K == 1, kWho, ".last_gradients: only for a single model");
  TORCH_CHECK(!I.ws.empty() && I.ws[0].ld > 0, kWho, ".last_gradients: no step has run yet");
  std::vector<at::Tensor> r;
  for (const auto& P : I.params) {
    float* p = P.is_bias ? I.ws[0].db[P.layer] : I.ws[0].dw[P.layer];
    r.push_back(at::from_blob(p, P.tensor.sizes(), at::kFloat).clone());
  }
  return r;
}

}  // namespace aiaas_fast
