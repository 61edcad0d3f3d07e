// Element types the kernels accept, and the host-side conversions between their storage and
// the accumulation type; shared by csrc/ and the bindings (no Python here). The CUDA
// kernels convert on the device with cuda_fp16.h / cuda_bf16.h (dtype_cuda.cuh).
#pragma once
#include <cstdint>
#include <cstring>

namespace shl {
enum class DType { kInvalid, kF32, kF64, kF16, kBF16, kU8, kI32, kI64, kI16 };

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// 16-bit storage, tagged so that overloads and traits tell fp16 from bf16.
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

// Conv<S>: accumulation type A of storage type S, load (S -> A) and store (A -> S, round to
// nearest even). fp16 <-> fp32 in integer arithmetic with selects (after F. Giesen's
// half_to_float and float_to_half_fast3_rtne): GCC 12 does not vectorise _Float16
// conversions, these do, and they are bit-exact with _Float16 casts (checked on all halves
// and on every 3rd float; NaN stays NaN, with a canonical payload on store).
template <class S>
struct Conv;
template <>
struct Conv<float> {
  using A = float;
  static A load(float v) { return v; }
  static float store(A v) { return v; }
};
template <>
struct Conv<double> {
  using A = double;
  static A load(double v) { return v; }
  static double store(A v) { return v; }
};
template <>
struct Conv<BF16> {
  using A = float;
  static A load(BF16 v) { return float_of(static_cast<uint32_t>(v.bits) << 16); }
  static BF16 store(A f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return BF16{static_cast<uint16_t>(u >> 16)};
  }
};
template <>
struct Conv<F16> {
  using A = float;
  static A load(F16 v) {
    const uint16_t h = v.bits;
    const uint32_t exp_mask = 0x7c00u << 13;
    uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;
    const uint32_t e = o & exp_mask;
    o += 112u << 23;                            // rebias 15 -> 127
    const uint32_t inf_nan = o + (112u << 23);  // exponent all ones
    const uint32_t sub = bits_of(float_of(o + (1u << 23)) - float_of(113u << 23));  // renormalise
    o = e == exp_mask ? inf_nan : (e == 0 ? sub : o);
    return float_of(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
  }
  static F16 store(A x) {
    uint32_t f = bits_of(x);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    const uint32_t inf_nan = f > (255u << 23) ? 0x7e00u : 0x7c00u;
    // Subnormal halves: adding 0.5 rounds the mantissa into place (round to nearest even).
    const uint32_t magic = 126u << 23;
    const uint32_t sub = bits_of(float_of(f) + float_of(magic)) - magic;
    // Normal halves: rebias, then round to nearest even through the 13 dropped bits.
    const uint32_t rebias = static_cast<uint32_t>(15 - 127) << 23;
    const uint32_t norm = (f + rebias + 0xfffu + ((f >> 13) & 1u)) >> 13;
    const uint32_t o = f >= (143u << 23) ? inf_nan : (f < (113u << 23) ? sub : norm);
    return F16{static_cast<uint16_t>(o | (sign >> 16))};
  }
};

// Host storage type of each floating DType.
template <DType D>
struct HostStorage;
template <>
struct HostStorage<DType::kF32> {
  using type = float;
};
template <>
struct HostStorage<DType::kF64> {
  using type = double;
};
template <>
struct HostStorage<DType::kF16> {
  using type = F16;
};
template <>
struct HostStorage<DType::kBF16> {
  using type = BF16;
};
}  // namespace shl
