// Argument checks at the door of every op, shared by the CPU and CUDA kernels so
// each backend refuses the same inputs with the same message.
#pragma once

#include <array>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <utility>

#include <ATen/core/Tensor.h>

namespace aiaas_fast::checks {

void linear_relu_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
void linear_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& out);

// t as a (rows, cols) matrix, rows the product of its leading sizes: also for cols == 0,
// where reshape({-1, 0}) cannot infer the rows.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, cols});
}

// Forward-mode AD (torch.func.jvp, dual tensors): the ops have no formula for it, so a dual
// input is refused with a clear error rather than its tangent silently dropped.
void no_forward_ad(std::string_view op, std::initializer_list<at::Tensor> inputs);

// For the C++ API: an undefined at::Tensor (a default-constructed one) named, before the
// dispatcher sees it (which fails with "Unimplemented scalar type" or picks no kernel).
void require_defined(std::string_view op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args);
void require_defined(std::string_view op, const char* name, at::TensorList list);

enum class Reduction { none, mean, sum };
Reduction parse_reduction(std::string_view op, std::string_view reduction);
// The broadcast shape of input and target, or a clear error.
std::vector<int64_t> mse_loss_args(const at::Tensor& input, const at::Tensor& target);

void adam_hyperparameters(double lr, double beta1, double beta2, double weight_decay, double eps);
void adam_tensors(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                  bool amsgrad, bool fp32_state_ok = false);
// fp32_state_ok (the CUDA kernel): 16-bit params may keep float32 state, one state dtype per group.

}  // namespace aiaas_fast::checks
