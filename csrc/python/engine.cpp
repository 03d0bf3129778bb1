// aiaas_fast._C.MLPEngine: the training engine for Python. Tensors cross through torch's own
// pybind11 casters (so the module is built with torch's pybind11); the long calls drop the
// GIL, and a run's callback takes it back only for the moment it runs.
#include <optional>

#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "aiaas_fast/engine.h"

namespace py = pybind11;

namespace aiaas_fast::python {

void bind_engine(py::module_& m) {
  py::class_<MLPEngine>(m, "MLPEngine", "Whole training steps and runs of K MLPs in C++ (see aiaas_fast.engine).")
      .def(py::init([](std::vector<at::Tensor> weights, std::vector<std::optional<at::Tensor>> biases,
                       std::vector<bool> relu, std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                       std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> steps, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                       bool decoupled_weight_decay, std::string path) {
             TORCH_CHECK(biases.size() == weights.size() && relu.size() == weights.size(),
                         "aiaas_fast.MLPEngine: weights, biases and relu must have one entry per layer, got ",
                         weights.size(), ", ", biases.size(), " and ", relu.size());
             std::vector<EngineLayer> layers;
             for (size_t l = 0; l < weights.size(); ++l)
               layers.push_back({weights[l], biases[l].value_or(at::Tensor()), static_cast<bool>(relu[l])});
             EngineOptimizerState state{std::move(exp_avgs), std::move(exp_avg_sqs), std::move(max_exp_avg_sqs),
                                        std::move(steps)};
             AdamOptions o{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay};
             return std::make_unique<MLPEngine>(std::move(layers), std::move(state), o, std::move(path));
           }),
           py::arg("weights"), py::arg("biases"), py::arg("relu"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
           py::arg("max_exp_avg_sqs"), py::arg("steps"), py::kw_only(), py::arg("lr"), py::arg("beta1"),
           py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
           py::arg("decoupled_weight_decay"), py::arg("path") = "auto")
      .def_property_readonly("num_models", &MLPEngine::num_models)
      .def_property_readonly("in_features", &MLPEngine::in_features)
      .def_property_readonly("out_features", &MLPEngine::out_features)
      .def("layer_paths", &MLPEngine::layer_paths, py::arg("batch_size"))
      .def(
          "set_hyperparameters",
          [](MLPEngine& e, double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
             bool maximize, bool decoupled_weight_decay) {
            e.set_options(AdamOptions{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay});
          },
          py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
          py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled_weight_decay"),
          // Each call takes the engine's lock: without the GIL, so a run on another thread whose
          // callback needs the GIL cannot deadlock with it.
          py::call_guard<py::gil_scoped_release>())
      .def("step", &MLPEngine::step, py::arg("x"), py::arg("y"), py::call_guard<py::gil_scoped_release>())
      .def(
          "run",
          [](MLPEngine& e, const at::Tensor& x, const at::Tensor& y, int64_t epochs, int64_t batch_size, uint64_t seed,
             bool shuffle, int64_t callback_every, std::optional<at::Tensor> sample_index,
             std::optional<at::Tensor> sample_offsets, py::object callback) {
            // Ctrl-C is seen at every call back point, with or without a Python callback.
            RunCallback cb = [callback](const RunProgress& p) {
              py::gil_scoped_acquire gil;
              if (PyErr_CheckSignals() != 0) throw py::error_already_set();
              if (callback.is_none()) return false;
              py::object r = callback(p.epoch, p.step, p.steps_in_epoch, p.epoch_end, p.losses);
              return !r.is_none() && py::cast<bool>(py::bool_(r));
            };
            RunOptions o{epochs, batch_size, seed, shuffle, callback_every};
            at::Tensor idx = sample_index.value_or(at::Tensor()), offs = sample_offsets.value_or(at::Tensor());
            py::gil_scoped_release nogil;
            return e.run(x, y, o, idx, offs, cb);
          },
          py::arg("x"), py::arg("y"), py::kw_only(), py::arg("epochs"), py::arg("batch_size"), py::arg("seed") = 0,
          py::arg("shuffle") = true, py::arg("callback_every") = 0, py::arg("sample_index") = py::none(),
          py::arg("sample_offsets") = py::none(), py::arg("callback") = py::none())
      .def("predict", &MLPEngine::predict, py::arg("x"), py::call_guard<py::gil_scoped_release>())
      .def("last_gradients", &MLPEngine::last_gradients, py::call_guard<py::gil_scoped_release>());
}

}  // namespace aiaas_fast::python
