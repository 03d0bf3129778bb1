#include "ops/scalar_read.h"

#include <atomic>

#include <c10/core/impl/LocalDispatchKeySet.h>

namespace aiaas_fast::detail {
namespace {

std::atomic<DeviceScalarPolicy> cuda_policy{nullptr};

bool traced(const at::Tensor& t) {
  const auto keys = c10::DispatchKeySet(
      {c10::DispatchKey::Python, c10::DispatchKey::Functionalize, c10::DispatchKey::PythonTLSSnapshot});
  return t.key_set().has_any(keys) || c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python);
}

}  // namespace

void set_cuda_scalar_policy(DeviceScalarPolicy policy) { cuda_policy.store(policy); }

bool may_read_scalar(const at::Tensor& t, int64_t work) {
  if (!t.defined() || t.numel() != 1 || traced(t)) return false;
  if (t.is_cpu()) return true;
  const DeviceScalarPolicy policy = cuda_policy.load();
  return t.is_cuda() && policy != nullptr && policy(t, work);
}

}  // namespace aiaas_fast::detail
