// aiaas_fast::linear_relu: relu(x @ weight.T + bias), and its backward from the saved output.
// CPU kernel: the product through ATen (MKL/oneDNN) into the output buffer, then bias and
// ReLU in one vectorized pass over it (16-bit types: the bias in the product, then ReLU).
// Backward: one pass over (grad_out, out) writes the masked gradient and accumulates the bias
// gradient, then two products.
// Autograd is registered here in C++, once for every device: the same formula through
// torch.library.register_autograd cost about 50 us more per forward+backward in Python.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "aiaas_fast/aiaas_fast.h"
#include "ops/checks.h"
#include "ops/cpu_dispatch.h"

namespace aiaas_fast {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // below this a pass is not worth waking a thread


int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

at::Tensor linear_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  checks::linear_relu_args(x, weight, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside record no graph
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const at::Tensor x2 = checks::as_rows(x, in_f);
  const int64_t rows = x2.size(0);
  at::Tensor out = at::empty({rows, out_f}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  // 16-bit types: the bias goes into the product (added to its float32 accumulator, as
  // F.linear does), so the result is rounded once; rounding the product first and adding the
  // bias after would round twice. float32 and float64: the product, then bias and ReLU in the
  // one pass (addmm would first copy the bias into every row: a pass more).
  const bool bias_in_product = has_bias && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
  if (bias_in_product) {
    at::addmm_out(out, *bias, x2, weight.t());
  } else {
    at::mm_out(out, x2, weight.t());
  }
  const at::Tensor b = has_bias && !bias_in_product ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "aiaas_fast.linear_relu", [&] {
    auto* o = kernel_ptr<scalar_t>(out);
    const auto* bp = b.defined() ? kernel_ptr<scalar_t>(b) : nullptr;  // nullptr: ReLU only
    const auto& k = cpu_kernels<scalar_t>();
    at::parallel_for(0, rows, grain_rows(out_f), [&](int64_t r0, int64_t r1) { k.bias_relu(o, bp, r0, r1, out_f); });
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out_f;
  return out.view(sizes);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    std::array<bool, 3> mask) {
  checks::linear_relu_backward_args(grad_out, x, weight, out);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside record no graph
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const at::Tensor g = checks::as_rows(grad_out, out_f).contiguous();
  const at::Tensor o = checks::as_rows(out, out_f).contiguous();
  const int64_t rows = g.size(0);
  const bool need_gm = mask[0] || mask[1];
  at::Tensor gm = need_gm ? at::empty_like(g) : at::Tensor();
  std::optional<at::Tensor> grad_x, grad_w, grad_b;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "aiaas_fast.linear_relu_backward", [&] {
    using A = cpu::acc_t<kernel_t<scalar_t>>;
    const auto& k = cpu_kernels<scalar_t>();
    const auto* gp = kernel_ptr<scalar_t>(g);
    const auto* op = kernel_ptr<scalar_t>(o);
    auto* mp = need_gm ? kernel_ptr<scalar_t>(gm) : nullptr;
    if (!mask[2]) {
      if (need_gm)
        at::parallel_for(0, rows, grain_rows(out_f),
                         [&](int64_t r0, int64_t r1) { k.relu_grad(gp, op, mp, nullptr, r0, r1, out_f); });
      return;
    }
    // Bias gradient: fixed blocks of rows, each summed into its own row of partial sums, then
    // the partials summed in block order, so the bits do not depend on the thread count.
    const int64_t block = grain_rows(out_f);
    const int64_t nblocks = std::max<int64_t>(1, (rows + block - 1) / block);
    std::vector<double> partial(static_cast<size_t>(nblocks * out_f), 0.0);  // in double: see Kernels::relu_grad
    double* pp = partial.data();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        k.relu_grad(gp, op, mp, pp + b * out_f, b * block, std::min(rows, (b + 1) * block), out_f);
    });
    for (int64_t b = 1; b < nblocks; ++b)
      for (int64_t c = 0; c < out_f; ++c) pp[c] += pp[b * out_f + c];
    grad_b = at::empty({out_f}, x.options());
    auto* gb = grad_b->data_ptr<scalar_t>();
    for (int64_t c = 0; c < out_f; ++c) gb[c] = static_cast<scalar_t>(static_cast<A>(pp[c]));
  });

  // (Running the two products side by side, one thread each, measured no faster at 256x64x64.)
  const at::Tensor x2 = checks::as_rows(x, in_f);
  if (mask[0]) grad_x = at::mm(gm, weight).view(x.sizes());
  if (mask[1]) grad_w = at::mm(gm.t(), x2);
  return {grad_x, grad_w, grad_b};
}

// Saves (x, weight, out): the ReLU mask is read back from the output, no mask tensor is kept.
class LinearReluFunction : public torch::autograd::Function<LinearReluFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = linear_relu(x, weight, bias);
    }
    ctx->save_for_backward({x, weight, out});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (at::GradMode::is_enabled()) return differentiable_backward(grads[0], saved[0], saved[1], saved[2], mask);
    auto [gx, gw, gb] = linear_relu_backward(grads[0], saved[0], saved[1], saved[2], mask);
    return {gx.value_or(at::Tensor()), gw.value_or(at::Tensor()), gb.value_or(at::Tensor())};
  }

  // backward(create_graph=True), for a gradient penalty or a second derivative: the same
  // formula in ATen ops that autograd records (the fused backward op has no derivative).
  // The mask is threshold_backward's, as torch's relu: NaN outputs pass the gradient, and
  // its (zero) derivative in out keeps the result in the graph even where nothing else
  // does (frozen weights: a second derivative in x is then zero, not an error).
  static torch::autograd::variable_list differentiable_backward(const at::Tensor& g, const at::Tensor& x,
                                                                const at::Tensor& weight, const at::Tensor& out,
                                                                const std::array<bool, 3>& mask) {
    const int64_t in_f = weight.size(1), out_f = weight.size(0);
    const at::Tensor gm = at::threshold_backward(g, out, 0);
    const at::Tensor gm2 = checks::as_rows(gm, out_f);
    at::Tensor gx, gw, gb;
    if (mask[0]) gx = gm.matmul(weight);
    if (mask[1]) gw = gm2.t().matmul(checks::as_rows(x, in_f));
    if (mask[2]) gb = gm2.sum(0);
    return {gx, gw, gb};
  }
};

at::Tensor linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  checks::no_forward_ad("aiaas_fast.linear_relu", {x, weight, bias.value_or(at::Tensor())});
  const bool needs_graph = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() ||
                                                          (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!needs_graph) {  // inference: no node, no saved tensors
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_relu(x, weight, bias);
  }
  return LinearReluFunction::apply(x, weight, bias);
}

// torch.autocast: as aten::linear, the op runs in the autocast dtype (bfloat16 or float16);
// the casts are autograd ops, so float32 parameters get float32 gradients. Without this, a
// layer after an autocast nn.Linear got a bfloat16 x and float32 weight: an error.
template <c10::DeviceType device>
at::Tensor linear_relu_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return linear_relu(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(dtype, weight, device),
                     at::autocast::cached_cast(dtype, bias, device));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aiaas_fast, m) {
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, bool[3] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(aiaas_fast, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

TORCH_LIBRARY_IMPL(aiaas_fast, Autograd, m) { m.impl("linear_relu", &linear_relu_autograd); }

TORCH_LIBRARY_IMPL(aiaas_fast, AutocastCPU, m) {
  m.impl("linear_relu", &linear_relu_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(aiaas_fast, AutocastCUDA, m) {
  m.impl("linear_relu", &linear_relu_autocast<c10::DeviceType::CUDA>);
}

at::Tensor linear_relu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aiaas_fast::linear_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  checks::require_defined("aiaas_fast::linear_relu", {{"x", &x}, {"weight", &weight}});
  return op.call(x, weight, bias);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    std::array<bool, 3> output_mask) {
  using Ret = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aiaas_fast::linear_relu_backward", "")
                       .typed<Ret(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  std::array<bool, 3>)>();
  checks::require_defined("aiaas_fast::linear_relu_backward",
                          {{"grad_out", &grad_out}, {"x", &x}, {"weight", &weight}, {"out", &out}});
  return op.call(grad_out, x, weight, out, output_mask);
}

}  // namespace aiaas_fast
