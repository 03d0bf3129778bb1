#include <sstream>

#include <ATen/Parallel.h>

#include "aiaas_fast/aiaas_fast.h"
#include "ops/cpu_dispatch.h"

namespace aiaas_fast {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.version = AIAAS_FAST_VERSION;
  info.torch_version = AIAAS_FAST_TORCH_VERSION;
  info.cuda = AIAAS_FAST_WITH_CUDA;
  info.cuda_archs = split(AIAAS_FAST_CUDA_ARCHS, ';');
  info.cutlass = AIAAS_FAST_BUILT_WITH_CUTLASS;
#if AT_PARALLEL_OPENMP
  info.openmp = AIAAS_FAST_OPENMP;  // torch's backend is OpenMP; ours is threaded only if built with it
  info.parallel_backend = AIAAS_FAST_OPENMP ? "OpenMP" : "OpenMP in torch, single-threaded in aiaas_fast";
#elif AT_PARALLEL_NATIVE
  info.parallel_backend = "native thread pool";
#else
  info.parallel_backend = "unknown";
#endif
  info.compiler = AIAAS_FAST_CXX_COMPILER;
  info.build_type = AIAAS_FAST_BUILD_TYPE;
  info.cpu_isas = split(AIAAS_FAST_CPU_ISAS, ';');
  info.cpu_isa = cpu_kernel_set().isa;
  return info;
}

}  // namespace aiaas_fast
