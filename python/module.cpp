// Entry point of shl_kernels._C: each kernel family registers its own functions.
#include <pybind11/pybind11.h>

#include <string>

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace shl {
void register_cpu(py::module_& m);  // python/bind_cpu.cpp
void register_elementwise(py::module_& m);  // python/bind_elementwise.cpp
void register_targets(py::module_& m);  // python/bind_targets.cpp
#ifdef SHL_WITH_CUDA
void register_cuda(py::module_& m);  // python/bind_cuda.cpp
#endif
}  // namespace shl

PYBIND11_MODULE(_C, m) {
  m.doc() = "shl-kernels native kernels (tensors in as DLPack capsules)";
  py::dict info;
#ifdef SHL_WITH_OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
#ifdef SHL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_arch"] = std::string(SHL_CUDA_ARCH);
#else
  info["cuda"] = false;
  info["cuda_arch"] = std::string();
#endif
  info["march"] = std::string(SHL_MARCH);
  info["compiler"] = std::string(__VERSION__);
  m.attr("build_info") = info;
  shl::register_cpu(m);
  shl::register_elementwise(m);
  shl::register_targets(m);
#ifdef SHL_WITH_CUDA
  shl::register_cuda(m);
#endif
}
