#include "ops/checks.h"

#include <cmath>

#include <c10/util/Exception.h>

namespace aiaas_fast::checks {
namespace {

// Names as Python prints them (torch.float32), not as C++ does (Float).
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void same_dtype_device(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                       const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
              " must have the same dtype, got ", name_a, ".dtype=", dtype_name(a.scalar_type()), " and ", name_b,
              ".dtype=", dtype_name(b.scalar_type()));
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b, " must be on the same device, got ",
              name_a, " on ", a.device(), " and ", name_b, " on ", b.device());
}

}  // namespace

void no_forward_ad(std::string_view op, std::initializer_list<at::Tensor> inputs) {
  for (const at::Tensor& t : inputs)
    TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(), op,
                ": forward-mode AD with dual tensors is not supported by the fused kernels; use torch.func.jvp "
                "through aiaas_fast.ops (which runs the ops' PyTorch composition there) or the reference backend "
                "(aiaas_fast.use_backend(\"reference\"))");
}

void require_defined(std::string_view op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  for (const auto& [name, t] : args) TORCH_CHECK(t->defined(), op, ": ", name, " is an undefined tensor");
}

void require_defined(std::string_view op, const char* name, at::TensorList list) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK(list[i].defined(), op, ": ", name, "[", i, "] is an undefined tensor");
}

void linear_relu_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "aiaas_fast.linear_relu";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features), got a 0-dim tensor");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": supports float32, float64, bfloat16 and float16, got x.dtype=", dtype_name(x.scalar_type()));
  same_dtype_device(op, "x", x, "weight", weight);
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has ", x.size(-1), " features (shape ", x.sizes(),
              ") but weight expects ", weight.size(1), " (shape ", weight.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    same_dtype_device(op, "x", x, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                weight.size(0), "] (out_features), got shape ", bias->sizes());
  }
}

void linear_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& out) {
  constexpr const char* op = "aiaas_fast.linear_relu_backward";
  linear_relu_args(x, weight, std::nullopt);
  same_dtype_device(op, "grad_out", grad_out, "x", x);
  same_dtype_device(op, "out", out, "x", x);
  auto expected = x.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out must have shape ", at::IntArrayRef(expected),
              " (x's shape with out_features last), got ", out.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), op, ": grad_out must have the shape of out ", out.sizes(), ", got ",
              grad_out.sizes());
}

Reduction parse_reduction(std::string_view op, std::string_view reduction) {
  if (reduction == "mean") return Reduction::mean;
  if (reduction == "sum") return Reduction::sum;
  if (reduction == "none") return Reduction::none;
  TORCH_CHECK_VALUE(false, op, ": reduction must be 'none', 'mean' or 'sum', got '", std::string(reduction), "'");
}

std::vector<int64_t> mse_loss_args(const at::Tensor& input, const at::Tensor& target) {
  constexpr const char* op = "aiaas_fast.mse_loss";
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), op,
              ": supports float32, float64, bfloat16 and float16, got input.dtype=", dtype_name(input.scalar_type()));
  same_dtype_device(op, "input", input, "target", target);
  std::vector<int64_t> out;
  const int64_t nd = std::max(input.dim(), target.dim());
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t ia = i - (nd - input.dim()), ib = i - (nd - target.dim());
    const int64_t a = ia >= 0 ? input.size(ia) : 1, b = ib >= 0 ? target.size(ib) : 1;
    TORCH_CHECK(a == b || a == 1 || b == 1, op, ": input and target shapes are incompatible: input ",
                input.sizes(), ", target ", target.sizes(), " (dimension ", i, ": ", a, " vs ", b, ")");
    out.push_back(a == 1 ? b : a);
  }
  return out;
}

void adam_hyperparameters(double lr, double beta1, double beta2, double weight_decay, double eps) {
  constexpr const char* op = "aiaas_fast.adam_";
  TORCH_CHECK(std::isfinite(lr) && lr >= 0, op, ": invalid learning rate lr=", lr, " (must be finite and >= 0)");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": invalid eps=", eps, " (must be finite and >= 0)");
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, op, ": invalid beta1=", beta1, " (must be in [0, 1))");
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, op, ": invalid beta2=", beta2, " (must be in [0, 1))");
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, op, ": invalid weight_decay=", weight_decay,
              " (must be finite and >= 0)");
}

void adam_tensors(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                  bool amsgrad, bool fp32_state_ok) {
  constexpr const char* op = "aiaas_fast.adam_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs and state_steps must have one entry per parameter, got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), " and ", state_steps.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, op, ": amsgrad needs one max_exp_avg_sq per parameter, got ",
              max_exp_avg_sqs.size(), " for ", n, " params");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined() && grads[i].defined(), op, ": params[", i, "] and grads[", i, "] must be tensors");
    TORCH_CHECK(is_supported_dtype(p.scalar_type()), op,
                ": supports float32, float64, bfloat16 and float16 params, got params[", i, "].dtype=",
                dtype_name(p.scalar_type()));
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type() && p.device() == params[0].device(), op, ": params[", i,
                "] is ", dtype_name(p.scalar_type()), " on ", p.device(), " but params[0] is ",
                dtype_name(params[0].scalar_type()), " on ", params[0].device(), "; call once per (device, dtype) group");
    // The state's dtype: the params', or (where allowed) float32 for 16-bit params, the same for the whole group.
    const bool half = p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf;
    const at::ScalarType state_dtype =
        fp32_state_ok && half && exp_avgs[0].defined() && exp_avgs[0].scalar_type() == at::kFloat ? at::kFloat
                                                                                                 : p.scalar_type();
    auto same = [&](const char* name, const at::Tensor& t, bool state) {
      TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
                  "] has shape ", p.sizes());
      const at::ScalarType want = state ? state_dtype : p.scalar_type();
      TORCH_CHECK(t.scalar_type() == want, op, ": ", name, "[", i, "].dtype=", dtype_name(t.scalar_type()),
                  " but params[", i, "].dtype=", dtype_name(p.scalar_type()),
                  want != p.scalar_type() ? " and exp_avgs[0].dtype=torch.float32" : "");
      TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
                  "] is on ", p.device());
    };
    same("grads", grads[i], false);
    same("exp_avgs", exp_avgs[i], true);
    same("exp_avg_sqs", exp_avg_sqs[i], true);
    if (amsgrad) same("max_exp_avg_sqs", max_exp_avg_sqs[i], true);
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && at::isFloatingType(s.scalar_type()), op, ": state_steps[", i,
                "] must be a one-element floating-point tensor, got ",
                s.defined() ? s.toString() : std::string("undefined"), " of shape ",
                s.defined() ? s.sizes() : at::IntArrayRef{});
  }
}

}  // namespace aiaas_fast::checks
