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

// Increments every step counter in place, then reads each one's new value: a step tensor
// shared by several params counts once per param and every one of them reads the final count,
// as torch's multi-tensor Adam does (_foreach_add_, then the update), and as the CUDA kernel's
// device steps do. host_only: CPU steps alone (the CUDA kernel increments device steps); 0 for
// the others. float32/float64 CPU steps without a dispatch; anything else through ATen.
inline std::vector<double> increment_steps(at::TensorList steps, bool host_only) {
  auto direct = [](const at::Tensor& s) {
    return s.is_cpu() && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble);
  };
  for (const at::Tensor& s : steps) {
    if (host_only && !s.is_cpu()) continue;
    if (!direct(s)) s.add_(1);
    else if (s.scalar_type() == at::kFloat) *s.data_ptr<float>() += 1.0f;
    else *s.data_ptr<double>() += 1.0;
  }
  std::vector<double> values(steps.size(), 0.0);
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    if (host_only && !s.is_cpu()) continue;
    values[i] = !direct(s) ? s.item<double>()
                : s.scalar_type() == at::kFloat ? double(*s.data_ptr<float>()) : *s.data_ptr<double>();
  }
  return values;
}

}  // namespace aiaas_fast
