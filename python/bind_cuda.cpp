// Bindings of the CUDA kernels (csrc/shl_cuda.cu); compiled only when nvcc was found.
// This file is plain C++: it validates the DLPack views on the host and calls the host
// entry points of the .cu; every check happens before any CUDA call.
#ifdef SHL_WITH_CUDA
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "shl_binding_args.h"

namespace py = pybind11;

namespace shl {
// Defined in csrc/shl_cuda.cu: driver/runtime versions and device count; nullptr on
// success, else the CUDA error text (e.g. no driver).
const char* shl_cuda_runtime_info(int* driver, int* runtime, int* devices);
// Defined in csrc/shl_cuda.cu: resident blocks per SM and dynamic shared memory of the staged
// SHL kernel for rows of C labels (0, 0 when the row does not fit shared memory).
const char* shl_cuda_staged_occupancy(DType z_dtype, int64_t C, int* blocks_per_sm,
                                      int* smem_bytes);

namespace {

void fused(const py::object& z, const py::object& pos, const py::object& ign, const py::object& order,
           const py::object& offsets, const py::object& w, const py::object& eta, const py::object& delta,
           double grad_scale, const py::object& loss, const py::object& grad, const py::object& grad_eta,
           uintptr_t stream, const py::object& position, bool staged,
           const py::object& schedule, int64_t block_min, int staged_threads, bool flat,
           bool async_staging, const py::object& loss_total,
           const py::object& grad_eta_total, const py::object& offsets_host,
           int64_t window_bytes, bool staging_only) {
  if (window_bytes < 0)
    throw py::value_error("window_bytes: expected 0 (all the device allows) or a byte count > 0");
  if (block_min < -1)
    throw py::value_error("block_min: expected -1 (the default) or a segment size >= 0");
  if (staged_threads != 0 && staged_threads != 256 && staged_threads != 512)
    throw py::value_error("staged_threads: expected 0 (the default, 512), 256 or 512");
  ShlArgs a = shl_args_from_capsules(Backend::kCUDA, z, pos, ign, order, offsets, w, eta, delta,
                                     grad_scale, loss, grad, grad_eta);
  const TensorView zv = view(z, "z");
  if (!position.is_none()) {
    if (order.is_none())
      throw py::value_error("position: given without order (it is order's inverse); pass None");
    const TensorView pv = view(position, "position");
    check_same_device(zv, pv);
    check_dtype(pv, {DType::kI32, DType::kI16}, "int32, or int16 holding uint16 values");
    check_shape(pv, {a.C});
    if (to_dtype(pv.dtype) == DType::kI32) {
      a.position = pv.ptr<const int32_t>();
    } else {
      if (a.C > 65536)
        throw py::value_error("position: 16-bit positions need C <= 65536 labels, got " +
                              std::to_string(a.C) + "; pass them as int32");
      a.position16 = pv.ptr<const uint16_t>();
    }
  }
  a.cuda_staging = staged ? 1 : 0;
  a.cuda_block_min = block_min;
  a.cuda_staged_threads = staged_threads;
  a.cuda_flat = flat ? 1 : 0;
  a.cuda_async_staging = async_staging ? 1 : 0;
  set_row_sums(a, zv, loss_total, grad_eta_total);
  if (!offsets_host.is_none()) {
    const TensorView hv = view(offsets_host, "offsets_host");
    if (!hv.on_cpu())
      throw py::value_error("offsets_host: expected a CPU tensor (a host copy of offsets); "
                            "pass offsets.cpu()");
    check_dtype(hv, {DType::kI64}, "int64");
    check_shape(hv, {a.m + 1});
    a.offsets_host = hv.ptr<const int64_t>();
  }
  a.cuda_window_bytes = window_bytes;
  a.cuda_staging_only = staging_only ? 1 : 0;
  if (!schedule.is_none())
    a.schedule = detail::arg(schedule, "schedule", zv, false, DType::kI32, "int32", {a.m})
                     .ptr<const int32_t>();
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
        py::arg("position") = py::none(), py::arg("staged") = true,
        py::arg("schedule") = py::none(), py::arg("block_min") = -1,
        py::arg("staged_threads") = 0, py::arg("flat") = true, py::arg("async_staging") = true,
        py::arg("loss_total") = py::none(),
        py::arg("grad_eta_total") = py::none(), py::arg("offsets_host") = py::none(),
        py::arg("window_bytes") = 0, py::arg("staging_only") = false,
        "Fused SHL loss rows and gradients on CUDA (contract: csrc/shl_args.h); tensors as DLPack "
        "capsules, stream the cudaStream_t as an int; enqueued on that stream, not synchronised. "
        "position (int32 [C], the inverse of order) lets rows that fit shared memory be staged "
        "there; staged=False forces the unstaged kernel. schedule (int32 [m], a permutation of the "
        "segment ids) is the order the segments are taken: largest first balances the warps, and the "
        "leading segments of at least block_min labels (-1: twice the block's threads) are each "
        "done by the whole block. staged_threads: threads per block of the staged kernel (0: 512, "
        "or 256, which fits three rows per SM where they fit shared memory). loss_total (0-dim) and "
        "grad_eta_total ([m]), optional, receive the sums over rows of loss and grad_eta, by a "
        "second launch (deterministic), so that a reduced loss needs no torch op after it. "
        "offsets_host (int64 [m + 1] on the CPU, the values of offsets) lets rows too large for "
        "shared memory be staged in windows of whole segments; window_bytes (0 = as the device "
        "allows) caps the shared memory of a staged row or window (tests, comparisons).");
  m.def(
      "cuda_staged_occupancy",
      [](const std::string& dtype, int64_t C) -> py::tuple {
        const DType dt = dtype == "float32"    ? DType::kF32
                         : dtype == "float64"  ? DType::kF64
                         : dtype == "float16"  ? DType::kF16
                         : dtype == "bfloat16" ? DType::kBF16
                                               : DType::kInvalid;
        if (dt == DType::kInvalid)
          throw py::value_error("dtype: expected 'float32', 'float64', 'float16' or 'bfloat16', got '" +
                                dtype + "'");
        if (C < 1) throw py::value_error("C: expected >= 1 labels");
        int blocks = 0, bytes = 0;
        const char* err = shl_cuda_staged_occupancy(dt, C, &blocks, &bytes);
        if (err) throw std::runtime_error(std::string("cuda_staged_occupancy: ") + err);
        return py::make_tuple(blocks, bytes);
      },
      py::arg("dtype"), py::arg("C"),
      "(resident blocks per SM, dynamic shared memory bytes) of the staged SHL kernel on the "
      "current device for rows of C labels; (0, 0) when a row does not fit shared memory.");
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
