// linear_relu on CUDA: the torch glue (checks, device guard, current stream, allocation)
// around the torch-free kernels of csrc/kernels/cuda/.
// Forward: one GEMM with bias and ReLU in its epilogue (CUTLASS, or cuBLASLt's RELU_BIAS
// epilogue; see glue.h for the choice), else a product and one bias+ReLU pass.
// Backward: one pass over (grad_out, out) writes the masked gradient and sums the bias
// gradient (deterministic two-stage sum), then the two products (cuBLAS). The mask cannot
// go into a GEMM epilogue here: it applies to this op's own output, which is an input of
// both products; cuBLASLt's DRELU epilogue masks a product's result, i.e. the previous
// layer's gradient, which needs the op boundary moved (noted in README).
#include <cstdlib>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "ops/checks.h"
#include "ops/gemm_counts.h"

namespace aiaas_fast {

namespace cuda_glue {

Gemm gemm_choice() {
  const char* env = std::getenv("AIAAS_FAST_CUDA_GEMM");  // read every call: tests switch it
  if (!env || !*env) return Gemm::automatic;
  const std::string v(env);
  if (v == "auto") return Gemm::automatic;
  if (v == "cutlass") return Gemm::cutlass;
  if (v == "cublaslt") return Gemm::cublaslt;
  if (v == "mm") return Gemm::mm;
  TORCH_CHECK(false, "aiaas_fast.linear_relu: AIAAS_FAST_CUDA_GEMM must be auto, cutlass, cublaslt or mm, got '", v,
              "'");
}

const char* gemm_name(Gemm g) {
  switch (g) {
    case Gemm::automatic: return "auto";
    case Gemm::cutlass: return "cutlass";
    case Gemm::cublaslt: return "cublaslt";
    case Gemm::mm: return "mm";
  }
  return "?";
}

int cc_major(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cache[device] = major;
  }
  return cache[device];
}

}  // namespace cuda_glue

namespace {

using cuda_glue::Gemm;

// A 2-D matrix the CUTLASS kernel can read in place: unit stride along K, a leading dimension
// that keeps 16-byte rows; otherwise a contiguous copy.
at::Tensor rowmajor_for_gemm(const at::Tensor& m) {
  if (m.stride(1) == 1 && m.stride(0) >= m.size(1) && m.stride(0) % 8 == 0) return m;
  return m.contiguous();
}

// Its leading dimension for the GEMM. A one-row matrix may carry any row stride (contiguous()
// keeps it), even one under its row length, which a TMA descriptor must not be given: its
// row length then, as there is no second row to reach.
int64_t leading_dim(const at::Tensor& m) { return m.size(0) == 1 ? m.size(1) : m.stride(0); }

at::Tensor linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "aiaas_fast.linear_relu";
  checks::linear_relu_args(x, weight, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside record no graph
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const at::Tensor x2 = checks::as_rows(x, in_f);
  const int64_t rows = x2.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const auto dtype = cuda_glue::dtype_of(x, op);
  const bool half = dtype == cuda::DType::bf16 || dtype == cuda::DType::f16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Gemm choice = cuda_glue::gemm_choice();
  if (choice == Gemm::automatic) {
    const int major = cuda_glue::cc_major(x.get_device());
    choice = half && major == 8 && cuda::have_cutlass_gemm() ? Gemm::cutlass : Gemm::cublaslt;
  }

  at::Tensor out;
  if (choice == Gemm::cutlass && half && cuda::have_cutlass_gemm() && cuda_glue::cc_major(x.get_device()) >= 8) {
    const at::Tensor xa = rowmajor_for_gemm(x2), wa = rowmajor_for_gemm(weight);
    // No bias: a zero vector keeps one kernel (the epilogue always adds C).
    const at::Tensor ba = has_bias ? b : at::zeros({out_f}, x.options());
    at::Tensor o = at::empty({rows, out_f}, x.options());
    // Hopper: the CUTLASS 3.x wgmma kernel where the build has it; else the 2.x kernel.
    const bool hopper = cuda_glue::cc_major(x.get_device()) == 9 && cuda::have_cutlass_sm90_gemm();
    const auto gemm = hopper ? cuda::linear_relu_gemm_sm90 : cuda::linear_relu_gemm;
    const cudaError_t err = gemm(dtype, rows, out_f, in_f, xa.data_ptr(), leading_dim(xa), wa.data_ptr(),
                                 leading_dim(wa), ba.data_ptr(), o.data_ptr(), stream);
    if (err == cudaSuccess) {
      out = o;
      detail::count_cuda_gemm(hopper ? "cutlass_sm90" : "cutlass_sm80");
    } else if (err == cudaErrorUnknown && *cuda::cutlass_failure()) {
      TORCH_CHECK(false, op, ": the CUTLASS GEMM (", hopper ? "sm90" : "sm80", ") failed for x of shape ", x.sizes(),
                  " and weight of shape ", weight.sizes(), " (", x.scalar_type(), "): ", cuda::cutlass_failure());
    } else if (err != cudaErrorNotSupported) {
      C10_CUDA_CHECK(err);
    }
    // else: a shape or alignment the kernel does not take; fall through to cuBLASLt
  }
  if (!out.defined() && choice != Gemm::mm && has_bias && dtype != cuda::DType::f64) {
    // cuBLASLt's RELU_BIAS epilogue, as torch uses it (falls back to addmm + relu inside
    // torch where cuBLASLt does not take the shapes).
    out = at::_addmm_activation(b, x2, weight.t(), 1, 1, /*use_gelu=*/false);
    if (!out.is_contiguous()) out = out.contiguous();
    detail::count_cuda_gemm("cublaslt");
  }
  if (!out.defined()) {
    out = at::mm(x2, weight.t());
    C10_CUDA_CHECK(cuda::bias_relu(dtype, out.data_ptr(), has_bias ? b.data_ptr() : nullptr, rows, out_f, stream));
    detail::count_cuda_gemm("mm");
  }
  auto sizes = x.sizes().vec();
  sizes.back() = out_f;
  return out.view(sizes);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    std::array<bool, 3> mask) {
  constexpr const char* op = "aiaas_fast.linear_relu_backward";
  checks::linear_relu_backward_args(grad_out, x, weight, out);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t in_f = weight.size(1), out_f = weight.size(0);
  const at::Tensor g = checks::as_rows(grad_out, out_f).contiguous();
  const at::Tensor o = checks::as_rows(out, out_f).contiguous();
  const int64_t rows = g.size(0);
  const auto dtype = cuda_glue::dtype_of(x, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool need_gm = mask[0] || mask[1];
  at::Tensor gm = need_gm ? at::empty_like(g) : at::Tensor();
  std::optional<at::Tensor> grad_x, grad_w, grad_b;
  if (mask[2]) grad_b = at::empty({out_f}, x.options());
  if (need_gm || mask[2]) {
    at::Tensor workspace;
    if (mask[2])
      workspace = at::empty({static_cast<int64_t>(cuda::relu_grad_workspace_bytes(dtype, rows, out_f))},
                            x.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::relu_grad(dtype, g.data_ptr(), o.data_ptr(), need_gm ? gm.data_ptr() : nullptr,
                                   mask[2] ? grad_b->data_ptr() : nullptr,
                                   mask[2] ? workspace.data_ptr() : nullptr, rows, out_f, stream));
  }
  const at::Tensor x2 = checks::as_rows(x, in_f);
  if (mask[0]) grad_x = at::mm(gm, weight).view(x.sizes());
  if (mask[1]) grad_w = at::mm(gm.t(), x2);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(aiaas_fast, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_relu_backward", &linear_relu_backward_cuda);
}

}  // namespace aiaas_fast
