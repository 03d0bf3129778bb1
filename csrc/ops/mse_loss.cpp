// aiaas_fast::mse_loss: the loss and its gradient (for grad_output = 1) in one pass.
// The autograd backward (below, in C++ for every device) only scales that saved
// gradient by grad_output; when grad_output is exactly 1 (loss.backward()) it hands the
// saved tensor on as is: no pass, no allocation (on a GPU only for large gradients, where
// reading grad_output, a device sync, costs less than the pass: ops/scalar_read.h).
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
#include "ops/scalar_read.h"

namespace aiaas_fast {
namespace {

// Fixed blocks: each block's sum is computed alone and the blocks are added in order,
// so the loss has the same bits for any number of threads.
constexpr int64_t kBlock = 32768;

std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                                                              c10::string_view reduction, bool compute_grad) {
  const auto red = checks::parse_reduction("aiaas_fast.mse_loss", reduction);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside record no graph
  const auto shape = checks::mse_loss_args(input, target);
  const bool broadcast = input.sizes() != at::IntArrayRef(shape) || target.sizes() != at::IntArrayRef(shape);
  const at::Tensor x = (broadcast ? input.expand(shape) : input).contiguous();
  const at::Tensor t = (broadcast ? target.expand(shape) : target).contiguous();
  const int64_t n = x.numel();
  at::Tensor grad = compute_grad ? at::empty(shape, input.options()) : at::Tensor();
  at::Tensor loss_elems = red == checks::Reduction::none ? at::empty(shape, input.options()) : at::Tensor();
  double total = 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "aiaas_fast.mse_loss", [&] {
    using A = cpu::acc_t<kernel_t<scalar_t>>;
    const auto& k = cpu_kernels<scalar_t>();
    const auto* xp = kernel_ptr<scalar_t>(x);
    const auto* tp = kernel_ptr<scalar_t>(t);
    auto* gp = compute_grad ? kernel_ptr<scalar_t>(grad) : nullptr;
    auto* lp = loss_elems.defined() ? kernel_ptr<scalar_t>(loss_elems) : nullptr;
    // d loss / d input = 2 (x - t), over numel for a mean; 2 / numel folded in double, as torch does.
    const A grad_scale = static_cast<A>(red == checks::Reduction::mean ? 2.0 / static_cast<double>(n) : 2.0);
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(nblocks, 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i = b * kBlock, len = std::min(kBlock, n - i);
        partial[b] = k.mse(xp + i, tp + i, gp ? gp + i : nullptr, lp ? lp + i : nullptr, grad_scale, len);
      }
    });
    for (double p : partial) total += p;
  });

  at::Tensor loss;
  switch (red) {
    case checks::Reduction::none: loss = loss_elems; break;
    case checks::Reduction::sum: loss = at::scalar_tensor(total, input.options()); break;
    case checks::Reduction::mean:  // 0 / 0 is NaN for an empty input, as torch's mean
      loss = at::scalar_tensor(total / static_cast<double>(n), input.options());
      break;
  }
  return {loss, compute_grad ? std::optional<at::Tensor>(grad) : std::nullopt};
}

class MseLossFunction : public torch::autograd::Function<MseLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                                                const at::Tensor& target, c10::string_view reduction,
                                                bool compute_grad) {
    at::Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [l, g] = mse_loss(input, target, std::string_view(reduction.data(), reduction.size()), compute_grad);
      loss = l;
      grad = g.value_or(at::Tensor());
    }
    const bool mean = checks::parse_reduction("aiaas_fast.mse_loss", reduction) == checks::Reduction::mean;
    ctx->saved_data["mean"] = mean;
    if (input.sizes() != target.sizes()) {  // broadcast: the gradients are summed back to each shape
      ctx->saved_data["input_sizes"] = input.sizes().vec();
      ctx->saved_data["target_sizes"] = target.sizes().vec();
    }
    // The inputs are saved too (references, no copies): for a scaled float16 mean the
    // gradient is recomputed from them, since grad_output * (2 (x - t) / n) would first
    // round 2 (x - t) / n to float16 and lose it below float16's range.
    ctx->save_for_backward({input, target, grad});
    if (!grad.defined()) grad = at::empty({0}, input.options());  // autograd outputs must be defined
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for that second output
    return {loss, grad};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &target = saved[1], &saved_grad = saved[2];
    const bool mean = ctx->saved_data["mean"].toBool();
    // backward(create_graph=True): the gradient from ATen ops that autograd records (the
    // tensor formula below), so that it has a derivative; the saved one has none.
    const bool graph = at::GradMode::is_enabled();
    // Read grad_output where that is free (CPU) or pays (a large gradient on a GPU: the
    // sync costs less than a pass over it); once, as on a GPU each read is a sync.
    const bool readable = !graph && detail::may_read_scalar(grad_loss, saved_grad.defined() ? saved_grad.numel() : 0);
    const double g = readable ? grad_loss.item<double>() : 0.0;
    at::Tensor grad;
    if (readable && g == 1.0 && saved_grad.defined()) {
      // The saved gradient is the answer. Autograd frees this node's saved tensors before
      // accumulating, so AccumulateGrad can take it without a copy (with retain_graph it copies).
      grad = saved_grad;
    } else if (graph || !saved_grad.defined() || (mean && input.scalar_type() == at::kHalf)) {
      // In float32 (double for double), rounded once at the end: with a float16 grad_output
      // tensor, grad_output * 2 / n would itself be a float16, subnormal past n = 32768.
      const double n = static_cast<double>(c10::multiply_integers(checks::mse_loss_args(input, target)));
      const double scale = mean ? 2.0 / n : 2.0;
      const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const at::Tensor diff = input.to(acc) - target.to(acc);
      grad = (readable ? diff * (g * scale) : diff * (grad_loss.to(acc) * scale)).to(input.scalar_type());
    } else if (readable) {
      grad = saved_grad * g;  // one scalar multiply pass
    } else {
      grad = saved_grad * grad_loss;
    }
    return sum_back(ctx, grad);
  }

  // The input's and target's gradients from the elementwise one, summed back to each shape
  // where they were broadcast.
  static torch::autograd::variable_list sum_back(torch::autograd::AutogradContext* ctx, const at::Tensor& grad) {
    const bool broadcast = ctx->saved_data.count("input_sizes") > 0;
    at::Tensor grad_input, grad_target;
    if (ctx->needs_input_grad(0))
      grad_input = broadcast ? grad.sum_to_size(ctx->saved_data["input_sizes"].toIntVector()) : grad;
    if (ctx->needs_input_grad(1))
      grad_target = broadcast ? (-grad).sum_to_size(ctx->saved_data["target_sizes"].toIntVector()) : -grad;
    return {grad_input, grad_target, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss_autograd(const at::Tensor& input, const at::Tensor& target,
                                                                   c10::string_view reduction, bool compute_grad) {
  checks::no_forward_ad("aiaas_fast.mse_loss", {input, target});
  const bool needs_graph = at::GradMode::is_enabled() && (input.requires_grad() || target.requires_grad());
  if (!needs_graph) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mse_loss(input, target, std::string_view(reduction.data(), reduction.size()), compute_grad);
  }
  auto out = MseLossFunction::apply(input, target, reduction, compute_grad);
  return {out[0], compute_grad ? std::optional<at::Tensor>(out[1]) : std::nullopt};
}

// torch.autocast: as aten::mse_loss, on autocast's float32 list: 16-bit inputs compute in
// float32 (a float16 loss above 65504 would be inf); float32 and float64 stay as they are.
template <c10::DeviceType device>
std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss_autocast(const at::Tensor& input, const at::Tensor& target,
                                                                   c10::string_view reduction, bool compute_grad) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  return mse_loss(at::autocast::cached_cast(at::kFloat, input, device),
                  at::autocast::cached_cast(at::kFloat, target, device),
                  std::string_view(reduction.data(), reduction.size()), compute_grad);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aiaas_fast, m) {
  m.def("mse_loss(Tensor input, Tensor target, str reduction=\"mean\", bool compute_grad=True) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(aiaas_fast, CPU, m) { m.impl("mse_loss", &mse_loss_cpu); }

TORCH_LIBRARY_IMPL(aiaas_fast, Autograd, m) { m.impl("mse_loss", &mse_loss_autograd); }

TORCH_LIBRARY_IMPL(aiaas_fast, AutocastCPU, m) { m.impl("mse_loss", &mse_loss_autocast<c10::DeviceType::CPU>); }

TORCH_LIBRARY_IMPL(aiaas_fast, AutocastCUDA, m) { m.impl("mse_loss", &mse_loss_autocast<c10::DeviceType::CUDA>); }

std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss(const at::Tensor& input, const at::Tensor& target,
                                                          std::string_view reduction, bool compute_grad) {
  using Ret = std::tuple<at::Tensor, std::optional<at::Tensor>>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aiaas_fast::mse_loss", "")
                       .typed<Ret(const at::Tensor&, const at::Tensor&, c10::string_view, bool)>();
  checks::require_defined("aiaas_fast::mse_loss", {{"input", &input}, {"target", &target}});
  return op.call(input, target, c10::string_view(reduction.data(), reduction.size()), compute_grad);
}

}  // namespace aiaas_fast
