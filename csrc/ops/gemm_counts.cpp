#include "ops/gemm_counts.h"

#include <mutex>

#include "aiaas_fast/aiaas_fast.h"

namespace aiaas_fast {
namespace {

std::mutex& counts_mutex() {
  static std::mutex mu;
  return mu;
}

std::map<std::string, int64_t>& counts() {
  static std::map<std::string, int64_t> c;
  return c;
}

}  // namespace

void detail::count_cuda_gemm(const char* name) {
  std::lock_guard<std::mutex> lock(counts_mutex());
  ++counts()[name];
}

std::map<std::string, int64_t> cuda_gemm_counts() {
  std::lock_guard<std::mutex> lock(counts_mutex());
  return counts();
}

}  // namespace aiaas_fast
