// aiaas_fast: the public C++ API. Every function calls the registered operator
// through the PyTorch dispatcher, so it runs the kernel for the tensors' device
// (CPU, and CUDA where compiled in). linear_relu and mse_loss have their autograd
// formulas registered in C++ (the Autograd key), so backward() through them works from
// C++ as from Python; linear_relu_backward is the fused backward kernel itself.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "aiaas_fast/build_config.h"

namespace aiaas_fast {

// relu(x @ weight.T + bias). x: (..., in), weight: (out, in), bias: (out) or none.
at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias = std::nullopt);

// Gradients of linear_relu from its saved output (the ReLU mask is out > 0).
// output_mask says which of (grad_x, grad_weight, grad_bias) to compute; the others are empty.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
linear_relu_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& out, std::array<bool, 3> output_mask = {true, true, true});

// MSE loss with reduction "none", "mean" or "sum", as torch::nn::functional::mse_loss.
// With compute_grad, also returns the gradient with respect to input for grad_output = 1,
// 2 (input - target) (divided by numel for "mean"), from the same pass over the data.
std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss(const at::Tensor& input, const at::Tensor& target,
                                                          std::string_view reduction = "mean",
                                                          bool compute_grad = true);

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 0.0;
  double eps = 1e-8;
  bool amsgrad = false;
  bool maximize = false;
  bool decoupled_weight_decay = false;  // AdamW
};

// One Adam (or AdamW) step on every tensor of a group, in place: params, exp_avgs,
// exp_avg_sqs, max_exp_avg_sqs (amsgrad only; else pass {}) and the step counters
// (one-element float tensors, incremented here). Same math as torch.optim.Adam.
void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const AdamOptions& options = {});

// How this copy was built, and which CPU kernels it runs.
struct BuildInfo {
  std::string version;
  std::string torch_version;
  bool cuda = false;
  std::vector<std::string> cuda_archs;  // "90a" where the Hopper CUTLASS GEMM was built
  bool cutlass = false;                  // CUTLASS GEMMs among the CUDA kernels
  bool openmp = false;
  std::string parallel_backend;
  std::string compiler;
  std::string build_type;
  std::vector<std::string> cpu_isas;  // compiled in
  std::string cpu_isa;                // chosen at run time for this CPU
};
BuildInfo build_info();

// How many linear_relu forwards on CUDA ran each product since the library loaded, by name:
// "cutlass_sm90" (the CUTLASS 3.x Hopper kernel), "cutlass_sm80" (CUTLASS 2.x), "cublaslt"
// (its RELU_BIAS epilogue), "mm" (a product, then the bias+ReLU kernel). The GEMM choice
// falls back where a kernel declines the shapes; this says what actually ran.
std::map<std::string, int64_t> cuda_gemm_counts();

}  // namespace aiaas_fast
