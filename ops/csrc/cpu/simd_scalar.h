// Scalar "vector" of width 1: the portable path and the definition the SIMD paths must match
// bit for bit. Software fp16 conversions, no compiler intrinsics.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include "adam_args.h"

namespace offload_engine {
namespace simd_scalar {

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  if (exp == 0x1F) return u2f(sign | 0x7F800000U | (mant << 13) | (mant ? 0x400000U : 0));
  if (exp == 0) return u2f(sign | f2u(float(mant) * 5.9604644775390625e-8f));  // mant * 2^-24
  return u2f(sign | ((exp + 112) << 23) | (mant << 13));
}

// float -> fp16, round to nearest even (NaN stays a quiet NaN with its top payload bits).
inline uint16_t float_to_half_rne(float f) {
  const uint32_t x = f2u(f), sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFU;
  if (ax >= 0x7F800000U) return uint16_t(sign | (ax > 0x7F800000U ? 0x7E00 | ((ax >> 13) & 0x3FF) : 0x7C00));
  if (ax >= 0x477FF000U) return uint16_t(sign | 0x7C00);         // >= 65520 rounds to inf
  if (ax < 0x38800000U) {                                          // below 2^-14: fp16 subnormal
    // Adding 0.5 makes the fp32 adder round at 2^-24, the fp16 subnormal step.
    return uint16_t(sign | (f2u(u2f(ax) + 0.5f) - 0x3F000000U));
  }
  const uint32_t odd = (ax >> 13) & 1;
  return uint16_t(sign | ((ax + 0xC8000FFFU + odd) >> 13));       // rebias 127->15, round
}

// float -> fp16, round toward zero (used after adding stochastic-rounding noise).
inline uint16_t float_to_half_rz(float f) {
  const uint32_t x = f2u(f), sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFU;
  if (ax > 0x7F800000U) return uint16_t(sign | 0x7E00 | ((ax >> 13) & 0x3FF));
  if (ax == 0x7F800000U) return uint16_t(sign | 0x7C00);
  if (ax >= 0x47800000U) return uint16_t(sign | 0x7BFF);          // finite overflow -> max
  if (ax < 0x38800000U) return uint16_t(sign | uint32_t(u2f(ax) * 16777216.0f));
  return uint16_t(sign | ((ax - 0x38000000U) >> 13));
}

// 4-bit codes, two per byte, element 2k in the low nibble. Plain functions live in this header
// (compiled for the baseline target in every unit), not in adam_kernel.h.
inline void unpack_nibbles(const uint8_t* packed, uint8_t* codes, int64_t n) {
  for (int64_t k = 0; k < n / 2; ++k) { codes[2 * k] = packed[k] & 0xF; codes[2 * k + 1] = packed[k] >> 4; }
}
inline void pack_nibbles(const uint8_t* codes, uint8_t* packed, int64_t n) {
  for (int64_t k = 0; k < n / 2; ++k) packed[k] = uint8_t(codes[2 * k] | (codes[2 * k + 1] << 4));
}

struct Vec {
  static constexpr int W = 1;
  using F = float;
  using U = uint32_t;

  static F set1(float x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }
  static F neg(F a) { return u2f(f2u(a) ^ 0x80000000U); }

  static F sign(F x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }  // as torch.sign on CPU: NaN -> 0

  static F load(const float* p) { return *p; }
  static F load(const bf16_t* p) { return u2f(uint32_t(p->bits) << 16); }
  static F load(const f16_t* p) { return half_to_float(p->bits); }

  static void store(float* p, F x) { *p = x; }
  static void store(bf16_t* p, F x) {
    const uint32_t b = f2u(x);
    p->bits = std::isnan(x) ? 0x7FC0 : uint16_t((b + 0x7FFFU + ((b >> 16) & 1)) >> 16);
  }
  static void store(f16_t* p, F x) { p->bits = float_to_half_rne(x); }

  static void store_sr(float* p, F x, U) { *p = x; }
  static void store_sr(bf16_t* p, F x, U r) {
    p->bits = std::isnan(x) ? 0x7FC0 : uint16_t((f2u(x) + (r >> 16)) >> 16);
  }
  static void store_sr(f16_t* p, F x, U r) {
    const uint32_t b = f2u(x);
    const float scale = std::max(u2f(std::min(b & 0x7F800000U, 0x7F000000U)) * 0x1p-23f, 0x1p-37f);
    const float noise = u2f(f2u(float(r >> 19) * scale) | (b & 0x80000000U));
    p->bits = float_to_half_rz(x + noise);
  }

  // ---- block-quantized state ----
  static U load_u8(const uint8_t* p) { return *p; }
  static void store_u8(uint8_t* p, U c) { *p = uint8_t(c); }
  static F gather(const float* table, U idx) { return table[idx]; }
  static F abs(F x) { return u2f(f2u(x) & 0x7FFFFFFFU); }
  static F max(F a, F b) { return a > b ? a : b; }  // NaN in a yields b: callers pass the new value as a
  static float reduce_max(F a) { return a; }
  // Values at or beyond 2 (inf) and NaN saturate to the top bucket of their sign, so every
  // key stays inside the table: +inf/+NaN take the highest code, -inf/-NaN the lowest.
  static U quantize(F x, const CodeTables& t) {
    const uint32_t b = f2u(x), e_raw = (b >> 23) & 0xFF;
    const bool tiny = int32_t(e_raw) < t.min_exponent, big = e_raw > 127;
    const uint32_t e = big ? 127 : e_raw;
    const uint32_t top = big ? (1U << t.mantissa_bits) - 1 : (b >> (23 - t.mantissa_bits)) & ((1U << t.mantissa_bits) - 1);
    const uint32_t mag = tiny ? 0 : 1 + ((e - t.min_exponent) << t.mantissa_bits) + top;
    const uint32_t entry = uint32_t(t.lut[(b >> 31) * uint32_t(t.keys_per_sign) + mag]);
    const uint32_t offset = entry & 0xFFFFFF;
    const uint32_t low_mask = (1U << (23 - t.mantissa_bits)) - 1;
    const uint32_t low = tiny ? 0 : (big ? low_mask : b & low_mask);
    return (entry >> 24) + ((b >> 31) ? (low < offset) : (low > offset));
  }

  static U random_bits(uint64_t seed, uint64_t index) {
    const uint32_t key = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + uint32_t(index >> 32) * 0x9E3779B9U));
    return mix32(uint32_t(index) ^ key);
  }
};

}  // namespace simd_scalar
}  // namespace offload_engine
