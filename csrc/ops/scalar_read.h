// Whether a backward may read a one-element grad_output on the host, to skip `work` elements
// of arithmetic when it holds a known value (1 for loss.backward()).
//
// CPU: whenever the tensor is real (not a fake or functional tensor traced by torch.compile,
// no Python dispatch mode active). CUDA: reading is a device sync, so the CUDA glue registers
// a policy (csrc/cuda/mse_loss.cpp): worth it above a size, never while a graph is captured.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace aiaas_fast::detail {

using DeviceScalarPolicy = bool (*)(const at::Tensor& scalar, int64_t work);
void set_cuda_scalar_policy(DeviceScalarPolicy policy);
bool may_read_scalar(const at::Tensor& t, int64_t work);

}  // namespace aiaas_fast::detail
