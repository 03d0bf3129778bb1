// The per-step scalars of Adam, folded on the host in double as torch.optim.Adam computes
// them in Python floats: shared by the adam_ op and the training engine.
#pragma once

#include <cmath>

#include "aiaas_fast/aiaas_fast.h"
#include "kernels/cpu/kernels.h"

namespace aiaas_fast {

template <typename A>
cpu::AdamScalars<A> adam_scalars(const AdamOptions& o, double step) {
  const double bc1 = 1 - std::pow(o.beta1, step);
  const double bc2 = 1 - std::pow(o.beta2, step);
  const auto wd_mode = kernels::weight_decay_mode(o.weight_decay, o.decoupled_weight_decay);
  return {A(o.lr), A(o.eps), A(o.weight_decay), A(1 - o.beta1), A(o.beta2), A(1 - o.beta2),
          A(1 - o.lr * o.weight_decay), A(o.lr / bc1), A(std::sqrt(bc2)), A(o.maximize ? -1 : 1), wd_mode,
          o.amsgrad};
}

}  // namespace aiaas_fast
