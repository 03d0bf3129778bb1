// The kernels' launchers (csrc/kernels/cuda/kernels.cuh) as plain C functions, for the
// tests to call through ctypes on CPU tensors' memory. The stream is null: the emulated
// launches run to completion before they return.
#include "kernels/cuda/kernels.cuh"

const char* emu_last_message();

using namespace aiaas_fast::cuda;

extern "C" {

const char* emu_failure() { return emu_last_message(); }

int emu_bias_relu(int dtype, void* out, const void* bias, int64_t rows, int64_t cols) {
  return bias_relu(DType(dtype), out, bias, rows, cols, nullptr);
}

size_t emu_relu_grad_workspace_bytes(int dtype, int64_t rows, int64_t cols) {
  return relu_grad_workspace_bytes(DType(dtype), rows, cols);
}

int emu_relu_grad(int dtype, const void* g, const void* out, void* gm, void* grad_bias, void* workspace, int64_t rows,
                  int64_t cols) {
  return relu_grad(DType(dtype), g, out, gm, grad_bias, workspace, rows, cols, nullptr);
}

size_t emu_mse_loss_workspace_bytes(int64_t n) { return mse_loss_workspace_bytes(n); }

int emu_mse_loss(int dtype, const void* x, const void* t, void* grad, void* loss, void* workspace, double grad_scale,
                 int reduction, int64_t n) {
  return mse_loss(DType(dtype), x, t, grad, loss, workspace, grad_scale, Reduction(reduction), n, nullptr);
}

// One parameter tensor per index of the arrays; a null max_exp_avg_sq without amsgrad.
int emu_adam(int param_dtype, int state_dtype, int64_t count, void** param, void** grad, void** exp_avg,
             void** exp_avg_sq, void** max_exp_avg_sq, const int64_t* n, void** step_f32, void** step_f64,
             const double* host_step, double lr, double beta1, double beta2, double weight_decay, double eps,
             int wd_mode, int amsgrad, int maximize) {
  AdamTensor* tensors = new AdamTensor[count > 0 ? count : 1];
  for (int64_t i = 0; i < count; ++i)
    tensors[i] = AdamTensor{param[i], grad[i], exp_avg[i], exp_avg_sq[i], max_exp_avg_sq[i], n[i],
                            static_cast<float*>(step_f32[i]), static_cast<double*>(step_f64[i]), host_step[i]};
  const AdamOptions options{lr, beta1, beta2, weight_decay, eps, WeightDecay(wd_mode), amsgrad != 0, maximize != 0};
  const int err = adam(DType(param_dtype), DType(state_dtype), tensors, count, options, nullptr);
  delete[] tensors;
  return err;
}

int emu_adam_max_tensors() { return kAdamMaxTensors; }
int emu_adam_max_blocks() { return kAdamMaxBlocks; }

}  // extern "C"
