#include "ops/cpu_dispatch.h"

#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

namespace aiaas_fast {
namespace {

bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == "default";
}

const cpu::KernelSet& set_for(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == "avx512") return cpu::isa_avx512::kernel_set();
  if (isa == "avx2") return cpu::isa_avx2::kernel_set();
#endif
  return cpu::isa_default::kernel_set();
}

const cpu::KernelSet& choose() {
  if (const char* forced = std::getenv("AIAAS_FAST_CPU_ISA"); forced && *forced) {
    std::string isa(forced);
    TORCH_CHECK(isa == "default" || isa == "avx2" || isa == "avx512",
                "AIAAS_FAST_CPU_ISA=", isa, " is not one of default, avx2, avx512");
    TORCH_CHECK(cpu_supports(isa), "AIAAS_FAST_CPU_ISA=", isa, " but this CPU (or build) does not support it");
    return set_for(isa);
  }
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_supports(isa)) return set_for(isa);
  return set_for("default");
}

}  // namespace

const cpu::KernelSet& cpu_kernel_set() {
  static const cpu::KernelSet& set = choose();
  return set;
}

const cpu::MlpKernels& cpu_mlp_kernels() {
  static const cpu::MlpKernels& k = [] () -> const cpu::MlpKernels& {
    const std::string isa = cpu_kernel_set().isa;
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == "avx512") return cpu::isa_avx512::mlp_kernels();
    if (isa == "avx2") return cpu::isa_avx2::mlp_kernels();
#endif
    return cpu::isa_default::mlp_kernels();
  }();
  return k;
}

}  // namespace aiaas_fast
