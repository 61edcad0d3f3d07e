// Bindings of the float-targets-to-mask conversion (csrc/targets*.{h,cpp,cu}).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../csrc/targets.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
namespace {

// t (any shape, floating) and out (uint8, t's number of elements and device), checked.
MaskArgs make_args(const py::object& t_, const py::object& out_, bool cuda) {
  const TensorView t = view(t_, "t"), out = view(out_, "out");
  check_dtype(t, {DType::kF32, DType::kF64, DType::kF16, DType::kBF16},
              "float32, float64, float16 or bfloat16 (bool and uint8 need no conversion)");
  if (cuda ? !t.on_cuda() : !t.on_cpu())
    throw py::value_error(std::string("t: must be a ") + (cuda ? "CUDA" : "CPU") + " tensor");
  check_dtype(out, {DType::kU8}, "uint8");
  check_same_device(t, out);
  if (out.numel() != t.numel())
    throw py::value_error("out: expected " + std::to_string(t.numel()) + " elements (t's), got " +
                          std::to_string(out.numel()));
  MaskArgs a;
  a.t = t.data;
  a.t_dtype = to_dtype(t.dtype);
  a.n = t.numel();
  a.out = out.ptr<uint8_t>();
  a.device = t.on_cuda() ? static_cast<int>(t.device.device_id) : -1;
  return a;
}

}  // namespace

void register_targets(py::module_& m) {
  m.def(
      "targets_to_mask_cpu",
      [](py::object t, py::object out, int num_threads) {
        MaskArgs a = make_args(t, out, false);
        a.num_threads = num_threads;
        int bad = 0;
        const char* err;
        {
          py::gil_scoped_release nogil;
          err = targets_to_mask_cpu(a, &bad);
        }
        if (err) throw std::runtime_error(err);
        return bad != 0;
      },
      "out = (t != 0) as uint8 in one pass (t: dense 0/1 targets of a floating dtype); returns "
      "whether some value of t is neither 0 nor 1.",
      py::arg("t"), py::arg("out"), py::arg("num_threads") = 0);
#ifdef SHL_WITH_CUDA
  m.def(
      "targets_to_mask_cuda",
      [](py::object t, py::object out, py::object bad_, uintptr_t stream) {
        MaskArgs a = make_args(t, out, true);
        const TensorView bad = view(bad_, "bad");
        check_dtype(bad, {DType::kI32}, "int32");
        check_shape(bad, {1});
        check_same_device(view(t, "t"), bad);
        const char* err = targets_to_mask_cuda(a, bad.ptr<int32_t>(), reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(err);
      },
      "out = (t != 0) as uint8 in one pass on the stream; bad (int32 [1]) becomes 1 where some "
      "value of t is neither 0 nor 1, else 0 (read it after the launch: a host sync).",
      py::arg("t"), py::arg("out"), py::arg("bad"), py::arg("stream") = 0);
#endif
}

}  // namespace shl
