// What the CPU and CUDA Adam kernels share: the weight-decay modes, and how the op's
// arguments choose one. Torch-free and CUDA-free, so both kernel trees include it.
#pragma once

namespace aiaas_fast::kernels {

// none: plain Adam; l2: weight_decay * param added to the gradient (Adam);
// decoupled: param scaled by 1 - lr * weight_decay before the update (AdamW).
enum class WeightDecay : int { none = 0, l2 = 1, decoupled = 2 };

constexpr WeightDecay weight_decay_mode(double weight_decay, bool decoupled) {
  return weight_decay == 0 ? WeightDecay::none : decoupled ? WeightDecay::decoupled : WeightDecay::l2;
}

}  // namespace aiaas_fast::kernels
