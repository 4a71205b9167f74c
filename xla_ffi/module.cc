// pybind11 module that hands the XLA FFI handlers to Python as capsules.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_ext, m) {
  m.doc() = "jax_roi XLA FFI kernels";
  m.def("cpu_targets", []() { return py::dict(); });
  m.def("cuda_targets", []() { return py::dict(); });
  m.attr("has_cuda") = false;
}
