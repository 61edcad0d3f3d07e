// Bindings of the CUDA kernels (csrc/shl_cuda.cu); compiled only when nvcc was found.
// This file is plain C++: it validates the DLPack views on the host and calls the host
// entry points of the .cu; every check happens before any CUDA call.
#ifdef SHL_WITH_CUDA
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "shl_args.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
// Defined in csrc/shl_cuda.cu: driver/runtime versions and device count; nullptr on
// success, else the CUDA error text (e.g. no driver).
const char* shl_cuda_runtime_info(int* driver, int* runtime, int* devices);

namespace {

// A view of `obj` on z's device (None allowed when optional).
TensorView arg(const py::object& obj, const char* name, const TensorView& z, bool optional) {
  TensorView v = view(obj, name, optional);
  if (present(v)) check_same_device(z, v);
  return v;
}

// dtype and shape of a view, when present.
void expect(const TensorView& v, DType dt, const char* dt_name, std::initializer_list<int64_t> shape) {
  if (!present(v)) return;
  check_dtype(v, {dt}, dt_name);
  check_shape(v, shape);
}

int64_t nbytes(const TensorView& v) { return v.numel() * ((v.dtype.bits + 7) / 8); }

void fused(const py::object& z, const py::object& pos, const py::object& ign, const py::object& order,
           const py::object& offsets, const py::object& w, const py::object& eta, const py::object& delta,
           double grad_scale, const py::object& loss, const py::object& grad, const py::object& grad_eta,
           uintptr_t stream) {
  const TensorView zv = view(z, "z");
  if (!zv.on_cuda())
    throw py::value_error("z: must be a CUDA tensor for the cuda backend (DLPack device type " +
                          std::to_string(zv.device.device_type) +
                          "); use the cpu backend or move it with .cuda()");
  if (zv.shape.size() != 2) throw py::value_error("z: expected a 2-d tensor [B, C]");
  check_dtype(zv, {DType::kF32, DType::kF64, DType::kF16, DType::kBF16},
              "float32, float64, float16 or bfloat16");
  const int64_t B = zv.shape[0], C = zv.shape[1];
  const DType zt = to_dtype(zv.dtype);
  const DType acc = zt == DType::kF64 ? DType::kF64 : DType::kF32;
  const char* acc_name = zt == DType::kF64 ? "float64 (z is float64)" : "float32 (z is not float64)";

  const TensorView posv = arg(pos, "pos", zv, false);
  expect(posv, DType::kU8, "uint8 or bool", {B, C});
  const TensorView ignv = arg(ign, "ign", zv, true);
  expect(ignv, DType::kU8, "uint8 or bool", {B, C});
  const TensorView orderv = arg(order, "order", zv, true);
  expect(orderv, DType::kI64, "int64", {C});
  const TensorView offv = arg(offsets, "offsets", zv, false);
  check_dtype(offv, {DType::kI64}, "int64");
  if (offv.shape.size() != 1 || offv.shape[0] < 1)
    throw py::value_error("offsets: expected a 1-d tensor [m + 1] with m >= 0");
  const int64_t m = offv.shape[0] - 1;
  const TensorView wv = arg(w, "w", zv, true);
  expect(wv, acc, acc_name, {C});
  const TensorView etav = arg(eta, "eta", zv, true);
  expect(etav, acc, acc_name, {m});
  const TensorView deltav = arg(delta, "delta", zv, true);
  expect(deltav, acc, acc_name, {C});
  const TensorView lossv = arg(loss, "loss", zv, false);
  expect(lossv, acc, acc_name, {B});
  const TensorView gradv = arg(grad, "grad", zv, false);
  expect(gradv, zt, "the dtype of z", {B, C});
  const TensorView getav = arg(grad_eta, "grad_eta", zv, true);
  expect(getav, acc, acc_name, {B, m});
  // In place is grad == z exactly; a partial overlap would be read after being written.
  const auto zb = reinterpret_cast<uintptr_t>(zv.data), gb = reinterpret_cast<uintptr_t>(gradv.data);
  if (gb != zb && gb < zb + nbytes(zv) && zb < gb + nbytes(gradv))
    throw py::value_error("grad: overlaps z without being z; pass z itself (in place) or a separate tensor");

  ShlArgs a;
  a.z = zv.data;
  a.z_dtype = zt;
  a.B = B;
  a.C = C;
  a.m = m;
  a.pos = posv.ptr<const uint8_t>();
  a.ign = ignv.ptr<const uint8_t>();
  a.order = orderv.ptr<const int64_t>();
  a.offsets = offv.ptr<const int64_t>();
  a.w = wv.data;
  a.eta = etav.data;
  a.delta = deltav.data;
  a.grad_scale = grad_scale;
  a.loss = lossv.data;
  a.grad = gradv.data;
  a.grad_eta = getav.data;
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = shl_fused_cuda(a, reinterpret_cast<void*>(stream));
  }
  if (err) throw std::runtime_error(std::string("shl_fused_cuda: ") + err);
}

}  // namespace

void register_cuda(py::module_& m) {
  m.def("shl_fused_cuda", &fused, py::arg("z"), py::arg("pos"), py::arg("ign"), py::arg("order"),
        py::arg("offsets"), py::arg("w"), py::arg("eta"), py::arg("delta"), py::arg("grad_scale"),
        py::arg("loss"), py::arg("grad"), py::arg("grad_eta"), py::arg("stream"),
        "Fused SHL loss rows and gradients on CUDA (contract: csrc/shl_args.h); tensors as DLPack "
        "capsules, stream the cudaStream_t as an int; enqueued on that stream, not synchronised.");
  m.def(
      "cuda_runtime_info",
      []() -> py::tuple {
        int driver = 0, runtime = 0, devices = 0;
        const char* err = shl_cuda_runtime_info(&driver, &runtime, &devices);
        if (err) return py::make_tuple(driver, runtime, std::string(err));
        return py::make_tuple(driver, runtime, devices);
      },
      "(driver version, runtime version, device count) from the CUDA runtime linked into the "
      "extension; the device count is replaced by the CUDA error text when it cannot be read "
      "(e.g. no driver).");
}
}  // namespace shl
#endif
