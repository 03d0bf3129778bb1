// Calls the fused ops through aiaas_fast's C++ API and checks each against plain ATen.
// Prints one line per check; exit code 0 when every check passes, 1 otherwise.
#include <cmath>
#include <cstdio>
#include <exception>
#include <string>

// ATen alone is enough: the ops are reached through the dispatcher, so the consumer
// needs neither torch/torch.h nor Python. It also keeps this file quick to compile.
#include <ATen/ATen.h>

#include <aiaas_fast/aiaas_fast.h>
#include <aiaas_fast/engine.h>

namespace {

int failures = 0;

void report(const std::string& what, bool ok, const std::string& detail = "") {
  std::printf("%-44s %s\n", what.c_str(), ok ? "ok" : "MISMATCH");
  if (!ok) {
    ++failures;
    std::printf("  %s\n", detail.c_str());
  }
}

// float32 throughout; the fused kernels sum in a different order than ATen, so allow
// a few ulps of the largest terms rather than bitwise equality.
void check(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol = 1e-5) {
  if (got.sizes() != want.sizes()) {
    return report(what, false, "got shape " + c10::str(got.sizes()) + ", want " + c10::str(want.sizes()));
  }
  const bool ok = at::allclose(got, want, tol, tol);
  report(what, ok, "max abs difference " + c10::str((got - want).abs().max().item<double>()));
}

void run_checks() {
  at::manual_seed(0);
  const auto info = aiaas_fast::build_info();
  std::printf("aiaas_fast %s, built against torch %s, CPU kernels %s\n", info.version.c_str(),
              info.torch_version.c_str(), info.cpu_isa.c_str());

  // linear_relu with a leading batch dim and odd sizes, so no kernel path is a multiple
  // of a vector width.
  const int64_t in = 17, out_f = 9;
  const at::Tensor x = at::randn({2, 5, in}), w = at::randn({out_f, in}), b = at::randn({out_f});
  const at::Tensor out = aiaas_fast::linear_relu(x, w, b);
  check("linear_relu forward", out, at::relu(at::linear(x, w, b)));

  // Its backward works from the saved output: the ReLU mask is out > 0, so with
  // gm = grad * mask: grad_x = gm W, grad_w = gm^T x, grad_b = sum of gm over rows.
  const at::Tensor g = at::randn(out.sizes());
  auto [gx, gw, gb] = aiaas_fast::linear_relu_backward(g, x, w, out);
  const at::Tensor gm = (g * (out > 0)).reshape({-1, out_f});
  check("linear_relu backward: grad_x", gx.value(), at::mm(gm, w).view(x.sizes()));
  check("linear_relu backward: grad_weight", gw.value(), at::mm(gm.t(), x.reshape({-1, in})));
  check("linear_relu backward: grad_bias", gb.value(), gm.sum(0));

  // output_mask lets a caller skip gradients it does not need (e.g. a frozen input).
  auto [gx2, gw2, gb2] = aiaas_fast::linear_relu_backward(g, x, w, out, {false, true, false});
  report("linear_relu backward: output_mask", !gx2.has_value() && !gb2.has_value() && gw2.has_value() &&
                                                  at::allclose(*gw2, *gw, 1e-6, 1e-6),
         "expected only grad_weight, equal to the full call's");

  // mse_loss: every reduction, and the gradient for grad_output = 1 that the same pass
  // writes: 2 (input - target), divided by numel for "mean".
  const at::Tensor input = at::randn({7, 3}), target = at::randn({7, 3});
  const at::Tensor sq = (input - target).pow(2);
  const at::Tensor want_loss[] = {sq.mean(), sq.sum(), sq};
  const double grad_scale[] = {2.0 / input.numel(), 2.0, 2.0};
  const char* reductions[] = {"mean", "sum", "none"};
  for (int i = 0; i < 3; ++i) {
    auto [loss, grad] = aiaas_fast::mse_loss(input, target, reductions[i]);
    check(std::string("mse_loss ") + reductions[i], loss, want_loss[i]);
    check(std::string("mse_loss gradient ") + reductions[i], grad.value(), (input - target) * grad_scale[i]);
  }

  // One Adam step from zero state, in closed form:
  //   m = (1-b1) g,  v = (1-b2) g^2,  p -= lr / (1-b1) * m / (sqrt(v) / sqrt(1-b2) + eps).
  // The state must be written too, or the second step would be wrong.
  aiaas_fast::AdamOptions opt;
  opt.lr = 0.01;
  at::Tensor p = at::randn({33}), grad = at::randn({33});
  const at::Tensor p0 = p.clone();
  at::Tensor m = at::zeros({33}), v = at::zeros({33}), step = at::zeros({});
  aiaas_fast::adam_({p}, {grad}, {m}, {v}, {}, {step}, opt);
  const at::Tensor want_m = (1 - opt.beta1) * grad, want_v = (1 - opt.beta2) * grad * grad;
  check("adam_ one step: param", p,
        p0 - opt.lr / (1 - opt.beta1) * want_m / (want_v.sqrt() / std::sqrt(1 - opt.beta2) + opt.eps));
  check("adam_ one step: exp_avg", m, want_m);
  check("adam_ one step: exp_avg_sq", v, want_v);
  check("adam_ one step: step counter", step, at::ones({}));

  // The training engine, from C++: the seed network 10 -> 20 -> 1 learns y = sum(x) / 4.
  // Its first step must equal adam_ on the gradients of the same batch, computed by hand.
  at::manual_seed(0);
  at::Tensor w1 = at::randn({20, 10}) * 0.3, b1 = at::zeros({20}), w2 = at::randn({1, 20}) * 0.3, b2 = at::zeros({1});
  std::vector<at::Tensor> params{w1, b1, w2, b2}, exp_avgs, exp_avg_sqs, steps;
  for (const auto& t : params) {
    exp_avgs.push_back(at::zeros_like(t));
    exp_avg_sqs.push_back(at::zeros_like(t));
    steps.push_back(at::zeros({}));
  }
  aiaas_fast::AdamOptions eopt;
  eopt.lr = 1e-2;
  aiaas_fast::MLPEngine engine({{w1, b1, true}, {w2, b2, false}}, {exp_avgs, exp_avg_sqs, {}, steps}, eopt);
  const at::Tensor xs = at::randn({256, 10}), ys = xs.sum(1, true) / 4;
  const at::Tensor first = engine.run(xs, ys, {1, 32, 7, true, 0});
  const at::Tensor later = engine.run(xs, ys, {30, 32, 7, true, 0});
  const double first_loss = first[0][0].item<double>(), last_loss = later[29][0].item<double>();
  report("engine run: loss falls 10x in 31 epochs", last_loss < 0.1 * first_loss,
         "loss " + c10::str(first_loss) + " after 1 epoch, " + c10::str(last_loss) + " after 31");
  check("engine step counter", steps[0], at::full({}, 31.0 * 8));
  check("engine predict", engine.predict(xs)[0], at::relu(xs.matmul(w1.t()) + b1).matmul(w2.t()) + b2);

  // Bad input is a c10::Error that names the problem, never a crash.
  std::string message;
  try {
    aiaas_fast::linear_relu(at::Tensor(), w1);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  report("an undefined tensor is named in the error", message.find("x is an undefined tensor") != std::string::npos,
         "got: " + message);
}

}  // namespace

int main() {
  // An op that throws (a failed input check, an operator not registered) is a failure
  // to report like any other, not a crash.
  try {
    run_checks();
  } catch (const std::exception& e) {
    std::printf("exception: %s\n", e.what());
    ++failures;
  }
  if (failures) {
    std::printf("aiaas_fast C++ consumer: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("aiaas_fast C++ consumer: all checks passed\n");
  return 0;
}
