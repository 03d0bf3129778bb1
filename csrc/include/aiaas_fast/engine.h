// aiaas_fast::MLPEngine: whole training steps and whole runs of MLPs (Linear layers with
// optional ReLU, MSE loss, Adam/AdamW) in C++, for K independent models of one shape at once
// (K = 1 for a single model).
//
// The engine trains the parameter tensors it is given in place (so an nn.Module holding them
// always sees the trained weights) and updates the optimizer state tensors it is given (so a
// torch.optim.Adam holding them stays in step). It owns only its scratch buffers: activations
// and gradients, feature-major (features x batch), preallocated per thread.
//
// Calls on one engine are serialised (a mutex); a run's callback may call step()/predict().
// The tensors it was given must keep their storage and shape (step/run/predict check it), and
// may not share memory with each other (the constructor checks it).
// CPU, float32. Narrow layers run on hand-vectorized kernels (kernels/cpu/mlp.h) that call no
// BLAS; wide ones on ATen's matrix product (MKL/oneDNN). The switch is per layer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "aiaas_fast/aiaas_fast.h"

namespace aiaas_fast {

struct EngineLayer {
  at::Tensor weight;  // (out, in), or (K, out, in) for K models; float32, contiguous
  at::Tensor bias;    // (out) or (K, out); undefined for none
  bool relu = true;   // ReLU after this layer
};

// Adam state, one tensor per parameter in the order weight0, bias0, weight1, bias1, ...
// (biases left out where a layer has none), each shaped like its parameter; steps[p] holds K
// float32 counts (a 0-dim tensor for K = 1, as torch.optim.Adam keeps it).
struct EngineOptimizerState {
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs;  // the last empty unless amsgrad
  std::vector<at::Tensor> steps;
};

struct RunOptions {
  int64_t epochs = 1;
  int64_t batch_size = 64;
  uint64_t seed = 0;
  bool shuffle = true;          // each model's rows in a new order every epoch (per-model RNG from seed)
  int64_t callback_every = 0;   // call back every this many steps (0: only at the end of each epoch)
};

struct RunProgress {
  int64_t epoch;                 // 0-based
  int64_t step;                  // steps done in this epoch (the longest model's count)
  int64_t steps_in_epoch;
  bool epoch_end;
  std::vector<double> losses;    // per model: mean loss over the rows seen so far this epoch
};
// Return true to stop the run after this point.
using RunCallback = std::function<bool(const RunProgress&)>;

class MLPEngine {
 public:
  // path: "auto" (per layer, by size), "small" (hand kernels everywhere) or "blas" (ATen
  // products everywhere); the last two are for tests and measurements.
  MLPEngine(std::vector<EngineLayer> layers, EngineOptimizerState state, AdamOptions options,
            std::string path = "auto");
  ~MLPEngine();
  MLPEngine(const MLPEngine&) = delete;
  MLPEngine& operator=(const MLPEngine&) = delete;

  int64_t num_models() const;
  int64_t in_features() const;
  int64_t out_features() const;
  // "small" or "blas" for each layer at this batch size.
  std::vector<std::string> layer_paths(int64_t batch_size) const;
  void set_options(const AdamOptions& options);
  AdamOptions options() const;

  // One step (forward, MSE loss, backward, Adam) on one mini-batch. x: (B, in), shared by
  // every model, or (K, B, in); y: (B, out) or (K, B, out) (a 1-D y for out = 1). Returns the
  // K losses (float64).
  at::Tensor step(const at::Tensor& x, const at::Tensor& y);

  // Epochs of mini-batches over rows of x (N, in) and y (N, out). Model k trains on the rows
  // sample_index[sample_offsets[k] : sample_offsets[k + 1]] (repeats allowed: a bootstrap), or
  // on all rows when sample_index is undefined. Without shuffling, the rows go in that order.
  // The last batch of an epoch may be partial. Returns (epochs run, K) float64: each model's
  // mean loss per epoch, weighted by rows, as fit() reports it. Releases nothing itself; the
  // Python binding runs it without the GIL.
  at::Tensor run(const at::Tensor& x, const at::Tensor& y, const RunOptions& options,
                 const at::Tensor& sample_index = {}, const at::Tensor& sample_offsets = {},
                 const RunCallback& callback = {});

  // Forward pass of every model: x (N, in) -> (K, N, out).
  at::Tensor predict(const at::Tensor& x);

  // Gradients of the last step (K = 1 only), in parameter order: for tests.
  std::vector<at::Tensor> last_gradients() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aiaas_fast
