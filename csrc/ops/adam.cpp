// aiaas_fast::adam_: one call updates every parameter of a group in place, with the
// math of torch.optim.Adam / AdamW. CPU kernel: the group is cut into chunks of about
// kChunk elements across all tensors, one parallel region runs them, and each chunk is
// one vectorized pass that reads and writes each element of param and state once.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "aiaas_fast/aiaas_fast.h"
#include "ops/adam_group.h"
#include "ops/adam_scalars.h"
#include "ops/checks.h"
#include "ops/cpu_dispatch.h"

namespace aiaas_fast {
namespace {

constexpr int64_t kChunk = 16384;
// A thread gets at least this many chunks (64K elements): a parallel region for less costs
// more than it saves, and on a VM whose second core is often descheduled, a tiny region per
// step made small-model training 10x slower (measured with aiaas-fast train --compare).
constexpr int64_t kChunksPerThread = 4;

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  checks::adam_hyperparameters(lr, beta1, beta2, weight_decay, eps);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside record no graph
  checks::adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  const size_t n = params.size();
  if (n == 0) return;

  // Non-contiguous tensors are updated through contiguous copies written back at the end.
  const std::vector<AdamSlot> slots = adam_slots(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);

  // Work list: (tensor, begin, end) chunks over the whole group, so small tensors share threads.
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i)
    for (int64_t b = 0, numel = slots[i].p.numel(); b < numel; b += kChunk)
      chunks.push_back({i, b, std::min(numel, b + kChunk)});

  const AdamOptions options{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay};
  const std::vector<double> steps = increment_steps(state_steps, /*host_only=*/false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "aiaas_fast.adam_", [&] {
    using K = kernel_t<scalar_t>;
    using A = cpu::acc_t<K>;
    std::vector<cpu::AdamTensor<K>> views(n);
    std::vector<cpu::AdamScalars<A>> scalars(n);
    for (size_t i = 0; i < n; ++i) {
      const AdamSlot& s = slots[i];
      views[i] = {kernel_ptr<scalar_t>(s.p), kernel_ptr<scalar_t>(s.g), kernel_ptr<scalar_t>(s.m),
                  kernel_ptr<scalar_t>(s.v), amsgrad ? kernel_ptr<scalar_t>(s.vmax) : nullptr};
      scalars[i] = adam_scalars<A>(options, steps[i]);
    }
    const auto& k = cpu_kernels<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), kChunksPerThread, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        k.adam(views[ch.tensor], scalars[ch.tensor], ch.begin, ch.end);
      }
    });
  });

  adam_write_back(slots, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
}

// An optimizer step is not differentiable: run it below autograd (as torch.optim does
// under no_grad) and bump the version counters, so a tensor saved for a backward pass
// and then updated here is caught by autograd instead of giving a wrong gradient.
void adam_autograd(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
                   double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
          AdamOptions{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay});
  }
  for (auto list : {params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps})
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aiaas_fast, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(aiaas_fast, CPU, m) { m.impl("adam_", &adam_cpu); }

TORCH_LIBRARY_IMPL(aiaas_fast, Autograd, m) { m.impl("adam_", &adam_autograd); }

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const AdamOptions& o) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("aiaas_fast::adam_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                   at::TensorList, double, double, double, double, double, bool, bool, bool)>();
  constexpr std::string_view who = "aiaas_fast::adam_";
  checks::require_defined(who, "params", params);
  checks::require_defined(who, "grads", grads);
  checks::require_defined(who, "exp_avgs", exp_avgs);
  checks::require_defined(who, "exp_avg_sqs", exp_avg_sqs);
  checks::require_defined(who, "max_exp_avg_sqs", max_exp_avg_sqs);
  checks::require_defined(who, "state_steps", state_steps);
  op.call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, o.lr, o.beta1, o.beta2,
          o.weight_decay, o.eps, o.amsgrad, o.maximize, o.decoupled_weight_decay);
}

}  // namespace aiaas_fast
