// Borrowed view of a tensor passed as a DLPack capsule, with the checks every binding
// needs. The capsule is not consumed: the producer (torch) keeps ownership and its
// deleter runs when the capsule is garbage-collected; the Python caller keeps the
// tensor alive for the duration of the call.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../csrc/dtype.h"
#include "dlpack_abi.h"

namespace shl {
namespace py = pybind11;

struct TensorView {
  void* data = nullptr;
  std::vector<int64_t> shape;
  DLDataType dtype{};
  DLDevice device{};
  std::string name;

  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  bool on_cuda() const { return device.device_type == kDLCUDA || device.device_type == kDLCUDAManaged; }
  bool on_cpu() const { return device.device_type == kDLCPU || device.device_type == kDLCUDAHost; }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

inline std::string dtype_name(DLDataType t) {
  std::string base = t.code == kDLFloat ? "float" : t.code == kDLBfloat ? "bfloat" : t.code == kDLInt ? "int"
                     : t.code == kDLUInt ? "uint" : t.code == kDLBool ? "bool" : "code" + std::to_string(t.code);
  return base + std::to_string(t.bits);
}

// Maps a DLPack dtype onto the kernels' enum; kInvalid when the kernels do not take it.
inline DType to_dtype(DLDataType t) {
  if (t.lanes != 1) return DType::kInvalid;
  if (t.code == kDLFloat && t.bits == 32) return DType::kF32;
  if (t.code == kDLFloat && t.bits == 64) return DType::kF64;
  if (t.code == kDLFloat && t.bits == 16) return DType::kF16;
  if (t.code == kDLBfloat && t.bits == 16) return DType::kBF16;
  if ((t.code == kDLUInt || t.code == kDLBool) && t.bits == 8) return DType::kU8;
  if (t.code == kDLInt && t.bits == 64) return DType::kI64;
  if (t.code == kDLInt && t.bits == 32) return DType::kI32;
  if (t.code == kDLInt && t.bits == 16) return DType::kI16;
  return DType::kInvalid;
}

// Parses a capsule (or None when optional) into a contiguous view; raises ValueError /
// TypeError naming the argument.
inline TensorView view(const py::object& obj, const char* name, bool optional = false) {
  TensorView v;
  v.name = name;
  if (obj.is_none()) {
    if (optional) return v;
    throw py::value_error(std::string(name) + ": required, got None");
  }
  if (!py::isinstance<py::capsule>(obj))
    throw py::type_error(std::string(name) + ": expected a DLPack capsule (torch.utils.dlpack.to_dlpack(t))");
  auto cap = obj.cast<py::capsule>();
  if (std::string(cap.name() ? cap.name() : "") != "dltensor")
    throw py::value_error(std::string(name) + ": DLPack capsule already consumed; pass a fresh one");
  auto* mt = static_cast<DLManagedTensor*>(cap.get_pointer());
  const DLTensor& t = mt->dl_tensor;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.dtype = t.dtype;
  v.device = t.device;
  v.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides && v.numel() > 0) {  // contiguous row-major required (size-1 dims and
                                     // tensors without elements may carry any stride)
    int64_t expect = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      if (t.shape[d] != 1 && t.strides[d] != expect)
        throw py::value_error(std::string(name) + ": must be contiguous; call .contiguous() first");
      expect *= t.shape[d];
    }
  }
  return v;
}

inline bool present(const TensorView& v) { return v.data != nullptr || !v.shape.empty(); }

inline void check_dtype(const TensorView& v, std::initializer_list<DType> ok, const char* what) {
  DType d = to_dtype(v.dtype);
  for (auto o : ok)
    if (d == o) return;
  throw py::type_error(v.name + ": unsupported dtype " + dtype_name(v.dtype) + "; expected " + what);
}

inline void check_shape(const TensorView& v, std::initializer_list<int64_t> shape) {
  std::vector<int64_t> s(shape);
  if (v.shape != s) {
    std::string want = "(", got = "(";
    for (auto x : s) want += std::to_string(x) + ",";
    for (auto x : v.shape) got += std::to_string(x) + ",";
    throw py::value_error(v.name + ": expected shape " + want + ") got " + got + ")");
  }
}

inline void check_same_device(const TensorView& a, const TensorView& b) {
  if (a.device.device_type != b.device.device_type || a.device.device_id != b.device.device_id)
    throw py::value_error(b.name + ": on a different device than " + a.name + "; move it with .to()");
}

}  // namespace shl
