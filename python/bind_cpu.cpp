// Bindings of the CPU kernels (csrc/*.cpp).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

#include "shl_binding_args.h"

namespace py = pybind11;

namespace shl {
namespace {

void fused_cpu(const py::object& z, const py::object& pos, const py::object& ign,
               const py::object& order, const py::object& offsets, const py::object& w,
               const py::object& eta, const py::object& delta, double grad_scale,
               const py::object& loss, const py::object& grad, const py::object& grad_eta,
               int num_threads, const py::object& loss_total,
               const py::object& grad_eta_total) {
  ShlArgs a = shl_args_from_capsules(Backend::kCPU, z, pos, ign, order, offsets, w, eta, delta,
                                     grad_scale, loss, grad, grad_eta);
  a.num_threads = num_threads;
  set_row_sums(a, view(z, "z"), loss_total, grad_eta_total);
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = shl_fused_cpu(a);
  }
  if (err) throw std::runtime_error(err);
}

}  // namespace

void register_cpu(py::module_& m) {
  m.def("omp_max_threads", []() {
#ifdef SHL_WITH_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("shl_fused_cpu", &fused_cpu, py::arg("z"), py::arg("pos"), py::arg("ign"),
        py::arg("order"), py::arg("offsets"), py::arg("w"), py::arg("eta"), py::arg("delta"),
        py::arg("grad_scale"), py::arg("loss"), py::arg("grad"), py::arg("grad_eta"),
        py::arg("num_threads") = 0, py::arg("loss_total") = py::none(),
        py::arg("grad_eta_total") = py::none(),
        "Fused SHL loss + gradient on CPU (see csrc/shl_args.h); tensors as DLPack "
        "capsules, optional ones may be None. loss_total (0-dim) and grad_eta_total ([m]), "
        "optional, receive the sums over rows of loss and grad_eta (fixed order). Raises "
        "RuntimeError when the kernel fails.");
}

}  // namespace shl
