// Calls the fused ops through aiaas_fast's C++ API and checks each against plain ATen.
// Exit code 0 when every check passes.
#include <cmath>
#include <cstdio>

#include <torch/torch.h>

#include <aiaas_fast/aiaas_fast.h>

namespace {

int failures = 0;

void check(const char* what, const at::Tensor& got, const at::Tensor& want, double tol = 1e-5) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, tol, tol);
  std::printf("%-40s %s\n", what, ok ? "ok" : "MISMATCH");
  if (!ok) {
    ++failures;
    std::printf("  got shape %s, want %s\n", c10::str(got.sizes()).c_str(), c10::str(want.sizes()).c_str());
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const auto info = aiaas_fast::build_info();
  std::printf("aiaas_fast %s, built against torch %s, CPU kernels %s\n", info.version.c_str(),
              info.torch_version.c_str(), info.cpu_isa.c_str());

  // linear_relu with a leading batch dim and odd sizes.
  const at::Tensor x = torch::randn({2, 5, 17}), w = torch::randn({9, 17}), b = torch::randn({9});
  const at::Tensor out = aiaas_fast::linear_relu(x, w, b);
  check("linear_relu forward", out, at::relu(at::linear(x, w, b)));

  // Its backward, from the saved output: the mask is out > 0.
  const at::Tensor g = torch::randn(out.sizes());
  auto [gx, gw, gb] = aiaas_fast::linear_relu_backward(g, x, w, out);
  const at::Tensor gm = (g * (out > 0)).reshape({-1, 9});
  check("linear_relu backward: grad_x", *gx, at::mm(gm, w).view(x.sizes()));
  check("linear_relu backward: grad_weight", *gw, at::mm(gm.t(), x.reshape({-1, 17})));
  check("linear_relu backward: grad_bias", *gb, gm.sum(0));

  // mse_loss: every reduction, and the gradient written by the same pass.
  const at::Tensor input = torch::randn({7, 3}), target = torch::randn({7, 3});
  for (auto [name, mode] : {std::pair{"mean", at::Reduction::Mean}, std::pair{"sum", at::Reduction::Sum},
                            std::pair{"none", at::Reduction::None}}) {
    auto [loss, grad] = aiaas_fast::mse_loss(input, target, name);
    check((std::string("mse_loss ") + name).c_str(), loss, at::mse_loss(input, target, mode));
    const double scale = mode == at::Reduction::Mean ? 2.0 / input.numel() : 2.0;
    check((std::string("mse_loss gradient ") + name).c_str(), *grad, (input - target) * scale);
  }

  // One Adam step from zero state, in closed form: m = (1-b1) g, v = (1-b2) g^2,
  // p -= lr / (1-b1) * m / (sqrt(v) / sqrt(1-b2) + eps).
  aiaas_fast::AdamOptions opt;
  opt.lr = 0.01;
  at::Tensor p = torch::randn({33}), grad = torch::randn({33});
  const at::Tensor p0 = p.clone();
  at::Tensor m = torch::zeros({33}), v = torch::zeros({33}), step = torch::zeros({});
  aiaas_fast::adam_({p}, {grad}, {m}, {v}, {}, {step}, opt);
  const at::Tensor want = p0 - opt.lr / (1 - opt.beta1) * ((1 - opt.beta1) * grad) /
                                   (((1 - opt.beta2) * grad * grad).sqrt() / std::sqrt(1 - opt.beta2) + opt.eps);
  check("adam_ one step", p, want);
  check("adam_ step counter", step, torch::ones({}));

  if (failures) {
    std::printf("aiaas_fast C++ consumer: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("aiaas_fast C++ consumer: all checks passed\n");
  return 0;
}
