// What the CPU and CUDA adam_ glue share: each parameter's tensors made contiguous where
// they are not (updated through copies that are written back at the end), and the
// increment of a step counter kept on the CPU.
#pragma once

#include <vector>

#include <ATen/ATen.h>

namespace aiaas_fast {

struct AdamSlot {
  at::Tensor p, g, m, v, vmax;  // vmax undefined unless amsgrad
  bool copied;                  // some tensor was not contiguous: p, m, v, vmax are copies
};

inline std::vector<AdamSlot> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, bool amsgrad) {
  std::vector<AdamSlot> slots(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const bool contiguous = params[i].is_contiguous() && grads[i].is_contiguous() && exp_avgs[i].is_contiguous() &&
                            exp_avg_sqs[i].is_contiguous() && (!amsgrad || max_exp_avg_sqs[i].is_contiguous());
    auto c = [&](const at::Tensor& t) { return contiguous ? t : t.contiguous(); };
    slots[i] = {c(params[i]), c(grads[i]), c(exp_avgs[i]), c(exp_avg_sqs[i]),
                amsgrad ? c(max_exp_avg_sqs[i]) : at::Tensor(), !contiguous};
  }
  return slots;
}

// Copies the updated copies back into the caller's non-contiguous tensors.
inline void adam_write_back(const std::vector<AdamSlot>& slots, at::TensorList params, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, bool amsgrad) {
  for (size_t i = 0; i < slots.size(); ++i) {
    if (!slots[i].copied) continue;
    params[i].copy_(slots[i].p);
    exp_avgs[i].copy_(slots[i].m);
    exp_avg_sqs[i].copy_(slots[i].v);
    if (amsgrad) max_exp_avg_sqs[i].copy_(slots[i].vmax);
  }
}

// Increments a step counter in place and returns its new value (float32/float64 CPU steps
// without a dispatch; anything else through ATen, which syncs for a device step).
inline double increment_step(const at::Tensor& step) {
  if (step.is_cpu() && step.scalar_type() == at::kFloat) return *step.data_ptr<float>() += 1.0f;
  if (step.is_cpu() && step.scalar_type() == at::kDouble) return *step.data_ptr<double>() += 1.0;
  step.add_(1);
  return step.item<double>();
}

}  // namespace aiaas_fast
