// AVX-512F vector of 16 floats. Include only in a translation unit compiled for AVX-512F
// (adam_avx512.cpp); every function here must match simd_scalar.h bit for bit.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include "adam_args.h"
#include "simd_scalar.h"

namespace offload_engine {
namespace simd_avx512 {

struct Vec {
  static constexpr int W = 16;
  using F = __m512;
  using U = __m512i;

  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F neg(F a) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000U))));
  }

  static F sign(F x) {  // as torch.sign on CPU: NaN -> 0
    const __m512 zero = _mm512_setzero_ps();
    const __m512 pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f));
    return _mm512_mask_mov_ps(pos, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
  }

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static F load(const f16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  static void store_u16(void* p, F x, U w) {
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    w = _mm512_mask_blend_epi32(nan, w, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(w));
  }

  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static void store(bf16_t* p, F x) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    store_u16(p, x, _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
  }
  static void store(f16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static void store_sr(float* p, F x, U) { store(p, x); }
  static void store_sr(bf16_t* p, F x, U rnd) {
    const __m512i b = _mm512_castps_si512(x);
    store_u16(p, x, _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_srli_epi32(rnd, 16)), 16));
  }
  static void store_sr(f16_t* p, F x, U rnd) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i e = _mm512_min_epu32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F800000)), _mm512_set1_epi32(0x7F000000));
    const __m512 scale = _mm512_max_ps(_mm512_mul_ps(_mm512_castsi512_ps(e), _mm512_set1_ps(0x1p-23f)), _mm512_set1_ps(0x1p-37f));
    const __m512 mag = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(rnd, 19)), scale);
    const __m512i sign = _mm512_and_si512(b, _mm512_set1_epi32(int(0x80000000U)));
    const __m512 noise = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(_mm512_add_ps(x, noise), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
  }

  // ---- block-quantized state ----
  static U load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store_u8(uint8_t* p, U c) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(c)); }
  static F gather(const float* table, U idx) { return _mm512_i32gather_ps(idx, table, 4); }
  static F abs(F x) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }  // NaN in a yields b, as the scalar path
  static float reduce_max(F a) { return _mm512_reduce_max_ps(a); }
  // Nearest code via the lookup table (see CodeLookup in quant/maps.py); matches Vec (scalar).
  static U quantize(F x, const CodeTables& t) {
    // Exponents above 127 (|x| >= 2, inf, NaN) saturate to the top bucket of their sign: the
    // key stays in the table (simd_scalar.h says the same).
    const __m512i b_raw = _mm512_castps_si512(x);
    const __m512i e_raw = _mm512_and_si512(_mm512_srli_epi32(b_raw, 23), _mm512_set1_epi32(0xFF));
    const __mmask16 big = _mm512_cmpgt_epi32_mask(e_raw, _mm512_set1_epi32(127));
    const __m512i b = _mm512_mask_or_epi32(b_raw, big, b_raw, _mm512_set1_epi32(0x007FFFFF));  // mantissa all ones
    const __m512i e = _mm512_min_epi32(e_raw, _mm512_set1_epi32(127));
    const __mmask16 normal = _mm512_cmpge_epi32_mask(e, _mm512_set1_epi32(t.min_exponent));
    const __mmask16 negative = _mm512_cmplt_epi32_mask(b_raw, _mm512_setzero_si512());  // sign bit (AVX-512F only)
    const __m512i top = _mm512_and_si512(_mm512_srl_epi32(b, _mm_cvtsi32_si128(23 - t.mantissa_bits)),
                                         _mm512_set1_epi32((1 << t.mantissa_bits) - 1));
    const __m512i rel = _mm512_sub_epi32(e, _mm512_set1_epi32(t.min_exponent));
    const __m512i mag = _mm512_maskz_add_epi32(normal, _mm512_set1_epi32(1),
                                               _mm512_add_epi32(_mm512_sll_epi32(rel, _mm_cvtsi32_si128(t.mantissa_bits)), top));
    const __m512i key = _mm512_mask_add_epi32(mag, negative, mag, _mm512_set1_epi32(t.keys_per_sign));
    const __m512i entry = _mm512_i32gather_epi32(key, t.lut, 4);
    const __m512i offset = _mm512_and_si512(entry, _mm512_set1_epi32(0xFFFFFF));
    const __m512i low = _mm512_maskz_and_epi32(normal, b, _mm512_set1_epi32((1 << (23 - t.mantissa_bits)) - 1));
    const __mmask16 up = (negative & _mm512_cmplt_epi32_mask(low, offset)) |
                         (__mmask16(~negative) & _mm512_cmpgt_epi32_mask(low, offset));
    const __m512i cand = _mm512_srli_epi32(entry, 24);
    return _mm512_mask_add_epi32(cand, up, cand, _mm512_set1_epi32(1));
  }

  static U mix32v(U x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x846ca68bU)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }
  // As simd_avx2::Vec::random_bits: one key for the 16 lanes unless they straddle a multiple
  // of 2^32 (an index_offset that is not a multiple of 16), then the scalar definition per lane.
  static U random_bits(uint64_t seed, uint64_t index) {
    using simd_scalar::mix32;
    if (uint32_t(index) > 0xFFFFFFFFU - (W - 1)) {
      alignas(64) uint32_t r[W];
      for (int j = 0; j < W; ++j) r[j] = simd_scalar::Vec::random_bits(seed, index + j);
      return _mm512_load_si512(r);
    }
    const uint32_t key = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + uint32_t(index >> 32) * 0x9E3779B9U));
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(index))),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return mix32v(_mm512_xor_si512(idx, _mm512_set1_epi32(int(key))));
  }
};

}  // namespace simd_avx512
}  // namespace offload_engine
