// aiaas_fast._C: the Python face of the C++ library. Loading it loads libaiaas_fast,
// which registers the operators with torch; the ops themselves are reached through
// torch.ops.aiaas_fast, so this module only carries what torch.ops cannot.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "aiaas_fast/aiaas_fast.h"

namespace py = pybind11;

namespace aiaas_fast::python {
void bind_engine(py::module_& m);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "aiaas_fast native extension";
  m.def("build_info", [] {
    const aiaas_fast::BuildInfo b = aiaas_fast::build_info();
    py::dict d;
    d["version"] = b.version;
    d["torch_version"] = b.torch_version;
    d["cuda"] = b.cuda;
    d["cuda_archs"] = b.cuda_archs;
    d["cutlass"] = b.cutlass;
    d["openmp"] = b.openmp;
    d["parallel_backend"] = b.parallel_backend;
    d["compiler"] = b.compiler;
    d["build_type"] = b.build_type;
    d["cpu_isas"] = b.cpu_isas;
    d["cpu_isa"] = b.cpu_isa;
    return d;
  });
  m.def("cuda_gemm_counts", &aiaas_fast::cuda_gemm_counts,
        "How many linear_relu forwards on CUDA ran each product (cutlass_sm90, cutlass_sm80, cublaslt, mm)");
  aiaas_fast::python::bind_engine(m);
}
