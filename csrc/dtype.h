// Element types the kernels accept; shared by csrc/ and the bindings (no Python here).
#pragma once
#include <cstdint>
#include <cstring>

namespace shl {
enum class DType { kInvalid, kF32, kF64, kF16, kBF16, kU8, kI32, kI64 };

// bf16 / fp16 <-> fp32 without any framework headers (round-to-nearest-even on store).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
#if defined(__FLT16_MAX__) && !defined(__CUDACC__)
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
#else
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
#ifndef __CUDACC__  // CUDA code converts with cuda_fp16.h; nvcc has no _Float16 here
inline uint16_t f32_to_f16(float f) {
#if defined(__FLT16_MAX__)
  _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
#else
#error "fp16 store needs a compiler with _Float16 (gcc >= 12 / clang >= 15 on x86-64 or aarch64)"
#endif
}
#endif
}  // namespace shl
