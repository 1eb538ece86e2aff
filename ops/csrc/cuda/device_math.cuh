// The per-element arithmetic of ops/csrc/cpu/simd_scalar.h (the scalar Vec, the definition
// every path matches bit for bit), for CUDA device code.
//
// [Note: one update math on the GPU] Every multiply, add, divide and sqrt below is spelled
// with its explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn): nvcc
// never fuses those into an FMA nor approximates them, whatever the flags (the build also
// passes --fmad=false and never --use_fast_math). Subnormals are kept (no -ftz), as on the
// CPU. Conversions to and from bf16/fp16 are integer code, not the hardware converters, so
// NaN payloads and rounding ties are handled exactly as the CPU's software converters do.
//
// [Note: x86 NaN results] IEEE leaves a NaN result's bits open, and the two machines differ:
// the GPU returns 0x7FFFFFFF, x86 returns its first NaN operand (quieted) or, for an invalid
// operation (inf/inf, 0*inf), the "default NaN" 0xFFC00000, which is negative. Those bits
// are visible (fp32 state and params, fp16 params, and through the sign the code a NaN
// quantizes to), so the kernels reproduce x86: each element is computed with plain IEEE ops
// (IeeeArith) and, only where a result is NaN, recomputed with X86Arith, whose ops return
// x86's NaN. Non-NaN results never depend on a NaN's bits (a NaN reaches every later result,
// except through sign(), which maps any NaN to 0), so the recomputation changes NaNs only.
// Left open: where two *different* NaNs meet in one op, x86 keeps the one in its first
// source operand, which the C++ compiler chooses; X86Arith keeps the left one. (In the
// update the colliding NaNs descend from one input NaN and carry the same bits.)
#pragma once
#include <cstdint>

#include "../cpu/adam_args.h"

namespace offload_engine {
namespace cuda {

__device__ __forceinline__ uint32_t f2u(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float u2f(uint32_t u) { return __uint_as_float(u); }

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float neg(float a) { return u2f(f2u(a) ^ 0x80000000U); }
__device__ __forceinline__ float abs_bits(float a) { return u2f(f2u(a) & 0x7FFFFFFFU); }
__device__ __forceinline__ bool is_nan(float a) { return (f2u(a) & 0x7FFFFFFFU) > 0x7F800000U; }

// The NaN x86 returns from an op whose IEEE result is NaN ([Note: x86 NaN results]).
__device__ __forceinline__ float quieted(float a) { return u2f(f2u(a) | 0x400000U); }
__device__ __forceinline__ float x86_nan(float a, float b) {
  return is_nan(a) ? quieted(a) : (is_nan(b) ? quieted(b) : u2f(0xFFC00000U));
}

struct IeeeArith {
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ static float div(float a, float b) { return __fdiv_rn(a, b); }
  __device__ static float sqrt(float a) { return __fsqrt_rn(a); }
};
struct X86Arith {  // the same results, NaN results as x86 makes them
  __device__ static float nan_as_x86(float r, float a, float b) { return is_nan(r) ? x86_nan(a, b) : r; }
  __device__ static float mul(float a, float b) { return nan_as_x86(__fmul_rn(a, b), a, b); }
  __device__ static float add(float a, float b) { return nan_as_x86(__fadd_rn(a, b), a, b); }
  __device__ static float div(float a, float b) { return nan_as_x86(__fdiv_rn(a, b), a, b); }
  __device__ static float sqrt(float a) { return nan_as_x86(__fsqrt_rn(a), a, a); }
};
// As torch.sign on CPU and the CPU kernels: NaN -> 0.
__device__ __forceinline__ float sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
// NaN in a yields b: callers pass the new value as a, so a NaN never enters an absmax.
__device__ __forceinline__ float max_new_first(float a, float b) { return a > b ? a : b; }

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

// Stochastic-rounding bits of element `index` of the stream (simd_scalar::Vec::random_bits).
__device__ __forceinline__ uint32_t random_bits(uint64_t seed, uint64_t index) {
  const uint32_t index_hi = uint32_t(index >> 32);
  const uint32_t key = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + index_hi * 0x9E3779B9U));
  return mix32(uint32_t(index) ^ key);
}

// ---- loads: fp32 / bf16 / fp16 -> fp32 (exact) ----
__device__ __forceinline__ float half_to_float(uint16_t h) {
  const uint32_t sign_bit = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  if (exp == 0x1F) return u2f(sign_bit | 0x7F800000U | (mant << 13) | (mant ? 0x400000U : 0));
  if (exp == 0) return u2f(sign_bit | f2u(mul(float(mant), 5.9604644775390625e-8f)));  // mant * 2^-24, exact
  return u2f(sign_bit | ((exp + 112) << 23) | (mant << 13));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) { return u2f(uint32_t(x.bits) << 16); }
__device__ __forceinline__ float to_float(f16_t x) { return half_to_float(x.bits); }

// ---- stores: fp32 -> fp32 / bf16 / fp16, nearest-even or stochastic ----
__device__ __forceinline__ uint16_t float_to_half_rne(float f) {
  const uint32_t x = f2u(f), s = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFU;
  if (ax >= 0x7F800000U) return uint16_t(s | (ax > 0x7F800000U ? 0x7E00 | ((ax >> 13) & 0x3FF) : 0x7C00));
  if (ax >= 0x477FF000U) return uint16_t(s | 0x7C00);
  if (ax < 0x38800000U) return uint16_t(s | (f2u(add(u2f(ax), 0.5f)) - 0x3F000000U));
  const uint32_t odd = (ax >> 13) & 1;
  return uint16_t(s | ((ax + 0xC8000FFFU + odd) >> 13));
}

__device__ __forceinline__ uint16_t float_to_half_rz(float f) {
  const uint32_t x = f2u(f), s = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFU;
  if (ax > 0x7F800000U) return uint16_t(s | 0x7E00 | ((ax >> 13) & 0x3FF));
  if (ax == 0x7F800000U) return uint16_t(s | 0x7C00);
  if (ax >= 0x47800000U) return uint16_t(s | 0x7BFF);
  if (ax < 0x38800000U) return uint16_t(s | uint32_t(mul(u2f(ax), 16777216.0f)));  // exact, then truncated
  return uint16_t(s | ((ax - 0x38000000U) >> 13));
}

template <class T> struct Rounded;
template <> struct Rounded<float> {
  __device__ static float nearest(float x) { return x; }
  __device__ static float stochastic(float x, uint32_t) { return x; }
};
template <> struct Rounded<bf16_t> {
  __device__ static bf16_t nearest(float x) {
    const uint32_t b = f2u(x);
    return bf16_t{is_nan(x) ? uint16_t(0x7FC0) : uint16_t((b + 0x7FFFU + ((b >> 16) & 1)) >> 16)};
  }
  __device__ static bf16_t stochastic(float x, uint32_t r) {
    return bf16_t{is_nan(x) ? uint16_t(0x7FC0) : uint16_t((f2u(x) + (r >> 16)) >> 16)};
  }
};
template <> struct Rounded<f16_t> {
  __device__ static f16_t nearest(float x) { return f16_t{float_to_half_rne(x)}; }
  __device__ static f16_t stochastic(float x, uint32_t r) {
    const uint32_t b = f2u(x);
    const uint32_t e = (b & 0x7F800000U) < 0x7F000000U ? (b & 0x7F800000U) : 0x7F000000U;
    const float scaled = mul(u2f(e), 0x1p-23f);
    const float scale = scaled < 0x1p-37f ? 0x1p-37f : scaled;  // std::max(scaled, 2^-37)
    const float noise = u2f(f2u(mul(float(r >> 19), scale)) | (b & 0x80000000U));
    return f16_t{float_to_half_rz(X86Arith::add(x, noise))};  // a NaN x keeps its payload, as on x86
  }
};

// The rounded value of the updated param as the CPU kernels store it. `stream_index` is the
// element's index in the stochastic-rounding stream: c.index_offset + its index in the tensor,
// as in adam_vector (callers add the offset once per chunk: adding it here made ptxas spill).
template <class P>
__device__ __forceinline__ P round_param(float x, const AdamCoeffs& c, uint64_t stream_index) {
  return c.rounding == Rounding::kStochastic ? Rounded<P>::stochastic(x, random_bits(c.seed, stream_index))
                                             : Rounded<P>::nearest(x);
}

// ---- block-quantized state: the packed-LUT nearest-code lookup (simd_scalar::Vec::quantize) ----
// `lut` may point to shared or global memory (the caller decides where the table lives).
__device__ __forceinline__ uint32_t quantize(float x, const int32_t* lut, int32_t min_exponent,
                                             int32_t mantissa_bits, int32_t keys_per_sign) {
  const uint32_t b = f2u(x), e_raw = (b >> 23) & 0xFF;
  const bool tiny = int32_t(e_raw) < min_exponent, big = e_raw > 127;
  const uint32_t e = big ? 127 : e_raw;
  const uint32_t top = big ? (1U << mantissa_bits) - 1 : (b >> (23 - mantissa_bits)) & ((1U << mantissa_bits) - 1);
  const uint32_t mag = tiny ? 0 : 1 + ((e - uint32_t(min_exponent)) << mantissa_bits) + top;
  const uint32_t entry = uint32_t(lut[(b >> 31) * uint32_t(keys_per_sign) + mag]);
  const uint32_t offset = entry & 0xFFFFFF;
  const uint32_t low_mask = (1U << (23 - mantissa_bits)) - 1;
  const uint32_t low = tiny ? 0 : (big ? low_mask : b & low_mask);
  return (entry >> 24) + ((b >> 31) ? (low < offset) : (low > offset));
}

// ---- the update of one element: adam_vector (ops/csrc/cpu/adam_kernel.h), same ops, same order ----
// `m`, `v`: the element's fp32 moments, updated in place (v untouched for Lion). Returns the new
// param in fp32, before rounding to its storage type. A: IeeeArith or X86Arith.
template <class A>
__device__ __forceinline__ float update_element(float param, float grad, float& m, float& v, const AdamCoeffs& c) {
  if (c.use_grad_scale) grad = A::mul(grad, c.grad_scale);
  if (c.maximize) grad = neg(grad);
  if (c.use_l2) grad = A::add(grad, A::mul(param, c.l2));
  if (c.adamw) param = A::mul(param, c.decay);
  if (c.lion) {  // Lion: step along the sign of an interpolation, then update the momentum
    const float direction = A::add(A::mul(m, c.beta1), A::mul(grad, c.one_minus_beta1));
    param = A::add(param, A::mul(sign(direction), c.neg_step_size));
    m = A::add(A::mul(m, c.beta2), A::mul(grad, c.one_minus_beta2));
  } else {
    m = A::add(A::mul(m, c.beta1), A::mul(grad, c.one_minus_beta1));
    v = A::add(A::mul(v, c.beta2), A::mul(A::mul(grad, c.one_minus_beta2), grad));
    const float denom = A::add(A::mul(A::sqrt(v), c.inv_bc2_sqrt), c.eps);
    param = A::add(param, A::mul(A::div(m, denom), c.neg_step_size));
  }
  return param;
}

// Whether an element's results need X86Arith: some result is NaN ([Note: x86 NaN results]).
__device__ __forceinline__ bool any_nan(float param, float m, float v, bool has_v) {
  return is_nan(param) || is_nan(m) || (has_v && is_nan(v));
}

}  // namespace cuda
}  // namespace offload_engine
