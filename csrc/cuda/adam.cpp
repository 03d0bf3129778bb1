// adam_ on CUDA: the group's tensors become one table for the multi-tensor kernel of
// csrc/kernels/cuda/adam.cu. Steps may be CUDA tensors (float32 or float64, on the params'
// device: incremented by the kernel launch, nothing read back, so the step can be captured
// in a CUDA graph) or CPU tensors (incremented here, as the CPU op does; what
// aiaas_fast.optim keeps). State is the params' dtype, or float32 for 16-bit params.
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "ops/adam_group.h"
#include "ops/checks.h"

namespace aiaas_fast {
namespace {

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  constexpr const char* op = "aiaas_fast.adam_";
  checks::adam_hyperparameters(lr, beta1, beta2, weight_decay, eps);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  checks::adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                       /*fp32_state_ok=*/true);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const auto param_dtype = cuda_glue::dtype_of(params[0], op);
  const auto state_dtype = cuda_glue::dtype_of(exp_avgs[0], op);
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = state_steps[i];
    // A CPU step goes into the launch as a number: a captured graph would replay it frozen.
    TORCH_CHECK(!s.is_cpu() || !capturing, op, ": state_steps[", i, "] is on the CPU while a CUDA graph is being ",
                "captured; its value would be frozen into the graph. Keep the steps on the params' device to capture");
    TORCH_CHECK(s.is_cpu() || s.device() == params[0].device(), op, ": state_steps[", i, "] is on ", s.device(),
                " but params are on ", params[0].device(), "; keep steps on the CPU or on the params' device");
    TORCH_CHECK(s.is_cpu() || s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                ": a CUDA state_steps[", i, "] must be float32 or float64, got ", s.scalar_type());
  }

  // Non-contiguous tensors are updated through contiguous copies written back at the end.
  const std::vector<AdamSlot> slots = adam_slots(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  const std::vector<double> host_steps = increment_steps(state_steps, /*host_only=*/true);
  std::vector<cuda::AdamTensor> table(n);
  for (size_t i = 0; i < n; ++i) {
    const AdamSlot& s = slots[i];
    const at::Tensor& step = state_steps[i];
    cuda::AdamTensor& e = table[i];
    e = {s.p.data_ptr(), s.g.data_ptr(), s.m.data_ptr(), s.v.data_ptr(), amsgrad ? s.vmax.data_ptr() : nullptr,
         s.p.numel(), nullptr, nullptr, 0.0};
    if (step.is_cpu()) e.host_step = host_steps[i];
    else if (step.scalar_type() == at::kFloat) e.step_f32 = step.data_ptr<float>();
    else e.step_f64 = step.data_ptr<double>();
  }
  const auto wd_mode = kernels::weight_decay_mode(weight_decay, decoupled_weight_decay);
  const cuda::AdamOptions options{lr, beta1, beta2, weight_decay, eps, wd_mode, amsgrad, maximize};
  const cudaError_t err = cuda::adam(param_dtype, state_dtype, table.data(), static_cast<int64_t>(n), options,
                                     c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorNotSupported, op, ": no CUDA kernel for ", params[0].scalar_type(), " params with ",
              exp_avgs[0].scalar_type(), " state");
  C10_CUDA_CHECK(err);

  adam_write_back(slots, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
}

}  // namespace

TORCH_LIBRARY_IMPL(aiaas_fast, CUDA, m) { m.impl("adam_", &adam_cuda); }

}  // namespace aiaas_fast
