// Bindings of the CPU kernels (csrc/*.cpp).
#include <pybind11/pybind11.h>

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
void register_cpu(py::module_& m) {
  m.def("omp_max_threads", []() {
#ifdef SHL_WITH_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
}  // namespace shl
