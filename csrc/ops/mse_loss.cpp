// aiaas_fast::mse_loss: the loss and 2 * (input - target) in the same single pass.
// The autograd backward (python/aiaas_fast/ops.py) only scales that saved tensor by
// grad_output (and 1/numel for "mean"); keeping the 1/numel out of the saved tensor
// spares float16 from underflow when the loss is scaled.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "aiaas_fast/aiaas_fast.h"
#include "ops/checks.h"
#include "ops/cpu_dispatch.h"

namespace aiaas_fast {
namespace {

// Fixed blocks: each block's sum is computed alone and the blocks are added in order,
// so the loss has the same bits for any number of threads.
constexpr int64_t kBlock = 32768;

std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                                                              c10::string_view reduction, bool compute_grad) {
  const auto red = checks::parse_reduction("aiaas_fast.mse_loss", reduction);
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
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    std::vector<A> partial(nblocks, A(0));
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i = b * kBlock, len = std::min(kBlock, n - i);
        partial[b] = k.mse(xp + i, tp + i, gp ? gp + i : nullptr, lp ? lp + i : nullptr, len);
      }
    });
    for (A p : partial) total += static_cast<double>(p);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(aiaas_fast, m) {
  m.def("mse_loss(Tensor input, Tensor target, str reduction=\"mean\", bool compute_grad=True) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(aiaas_fast, CPU, m) { m.impl("mse_loss", &mse_loss_cpu); }

std::tuple<at::Tensor, std::optional<at::Tensor>> mse_loss(const at::Tensor& input, const at::Tensor& target,
                                                          std::string_view reduction, bool compute_grad) {
  using Ret = std::tuple<at::Tensor, std::optional<at::Tensor>>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aiaas_fast::mse_loss", "")
                       .typed<Ret(const at::Tensor&, const at::Tensor&, c10::string_view, bool)>();
  return op.call(input, target, c10::string_view(reduction.data(), reduction.size()), compute_grad);
}

}  // namespace aiaas_fast
