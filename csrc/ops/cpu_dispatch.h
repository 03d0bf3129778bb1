// Picks the CPU kernel set for this CPU once, and maps ATen scalar types to the
// kernels' storage types.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/mlp.h"

namespace aiaas_fast {

// The set chosen from the CPU's features, or from AIAAS_FAST_CPU_ISA=default|avx2|avx512.
const cpu::KernelSet& cpu_kernel_set();
// The training engine's small-width kernels, for the same instruction set.
const cpu::MlpKernels& cpu_mlp_kernels();

template <typename scalar_t> struct KernelType { using type = scalar_t; };
template <> struct KernelType<c10::BFloat16> { using type = cpu::bf16; };
template <> struct KernelType<c10::Half> { using type = cpu::f16; };
template <typename scalar_t> using kernel_t = typename KernelType<scalar_t>::type;

static_assert(sizeof(c10::BFloat16) == sizeof(cpu::bf16) && sizeof(c10::Half) == sizeof(cpu::f16));

template <typename scalar_t>
const cpu::Kernels<kernel_t<scalar_t>>& cpu_kernels() {
  const cpu::KernelSet& set = cpu_kernel_set();
  if constexpr (std::is_same_v<scalar_t, float>) return set.f32;
  else if constexpr (std::is_same_v<scalar_t, double>) return set.f64;
  else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return set.bf16_;
  else return set.f16_;
}

template <typename scalar_t, typename TensorT>
kernel_t<scalar_t>* kernel_ptr(const TensorT& t) {
  return reinterpret_cast<kernel_t<scalar_t>*>(t.template data_ptr<scalar_t>());
}

}  // namespace aiaas_fast
