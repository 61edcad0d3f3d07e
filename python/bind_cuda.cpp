// Bindings of the CUDA kernels (csrc/*.cu); compiled only when nvcc was found.
#ifdef SHL_WITH_CUDA
#include <pybind11/pybind11.h>

#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
void register_cuda(py::module_& m) { (void)m; }
}  // namespace shl
#endif
