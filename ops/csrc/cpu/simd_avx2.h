// AVX2 + FMA + F16C vector of 8 floats. Include only in a translation unit compiled for
// those targets (adam_avx2.cpp); every function here must match simd_scalar.h bit for bit.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include "adam_args.h"
#include "simd_scalar.h"

namespace offload_engine {
namespace simd_avx2 {

struct Vec {
  static constexpr int W = 8;
  using F = __m256;
  using U = __m256i;

  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }

  static F sign(F x) {  // as torch.sign on CPU: NaN -> 0
    const __m256 zero = _mm256_setzero_ps();
    return _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f)),
                        _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), _mm256_set1_ps(-1.0f)));
  }

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static F load(const f16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  // Narrows eight u32 lanes holding 16-bit values to eight u16 and stores them.
  static void store_u16(void* p, U w) {
    const __m256i packed = _mm256_packus_epi32(w, w);  // per 128-bit lane: [a0..a3 a0..a3]
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
  }
  static U bf16_nan_fix(F x, U w) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(w, _mm256_set1_epi32(0x7FC0), nan);
  }

  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static void store(bf16_t* p, F x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    store_u16(p, bf16_nan_fix(x, r));
  }
  static void store(f16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static void store_sr(float* p, F x, U) { store(p, x); }
  static void store_sr(bf16_t* p, F x, U rnd) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_srli_epi32(rnd, 16)), 16);
    store_u16(p, bf16_nan_fix(x, r));
  }
  static void store_sr(f16_t* p, F x, U rnd) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i e = _mm256_min_epu32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F800000)), _mm256_set1_epi32(0x7F000000));
    const __m256 scale = _mm256_max_ps(_mm256_mul_ps(_mm256_castsi256_ps(e), _mm256_set1_ps(0x1p-23f)), _mm256_set1_ps(0x1p-37f));
    __m256 noise = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(rnd, 19)), scale);
    noise = _mm256_or_ps(noise, _mm256_and_ps(x, _mm256_set1_ps(-0.0f)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(_mm256_add_ps(x, noise), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
  }

  // ---- block-quantized state ----
  static U load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static void store_u8(uint8_t* p, U c) {  // lanes hold values < 256
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(words, words));
  }
  static F gather(const float* table, U idx) { return _mm256_i32gather_ps(table, idx, 4); }
  static F abs(F x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }  // NaN in a yields b, as the scalar path
  static float reduce_max(F a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  // Nearest code via the lookup table (see CodeLookup in quant/maps.py); matches Vec (scalar).
  static U quantize(F x, const CodeTables& t) {
    // Exponents above 127 (|x| >= 2, inf, NaN) saturate to the top bucket of their sign: the
    // key stays in the table (simd_scalar.h says the same).
    const __m256i b_raw = _mm256_castps_si256(x);
    const __m256i e_raw = _mm256_and_si256(_mm256_srli_epi32(b_raw, 23), _mm256_set1_epi32(0xFF));
    const __m256i big = _mm256_cmpgt_epi32(e_raw, _mm256_set1_epi32(127));
    const __m256i b = _mm256_or_si256(b_raw, _mm256_and_si256(big, _mm256_set1_epi32(0x007FFFFF)));  // mantissa all ones
    const __m256i e = _mm256_min_epi32(e_raw, _mm256_set1_epi32(127));
    const __m256i tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.min_exponent), e);
    const __m256i top = _mm256_and_si256(_mm256_srl_epi32(b, _mm_cvtsi32_si128(23 - t.mantissa_bits)),
                                         _mm256_set1_epi32((1 << t.mantissa_bits) - 1));
    const __m256i rel = _mm256_sub_epi32(e, _mm256_set1_epi32(t.min_exponent));
    __m256i mag = _mm256_add_epi32(_mm256_set1_epi32(1), _mm256_add_epi32(_mm256_sll_epi32(rel, _mm_cvtsi32_si128(t.mantissa_bits)), top));
    mag = _mm256_andnot_si256(tiny, mag);  // tiny -> key 0
    const __m256i neg = _mm256_srai_epi32(b, 31);  // all ones for negative x
    const __m256i key = _mm256_add_epi32(mag, _mm256_and_si256(neg, _mm256_set1_epi32(t.keys_per_sign)));
    const __m256i entry = _mm256_i32gather_epi32(t.lut, key, 4);
    const __m256i offset = _mm256_and_si256(entry, _mm256_set1_epi32(0xFFFFFF));
    const __m256i low = _mm256_andnot_si256(tiny, _mm256_and_si256(b, _mm256_set1_epi32((1 << (23 - t.mantissa_bits)) - 1)));
    const __m256i up = _mm256_blendv_epi8(_mm256_cmpgt_epi32(low, offset), _mm256_cmpgt_epi32(offset, low), neg);
    return _mm256_sub_epi32(_mm256_srli_epi32(entry, 24), up);  // up is -1 where the code rises
  }

  static U mix32v(U x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x846ca68bU)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }
  // Same stream as simd_scalar::Vec::random_bits for indices index .. index+7. The lanes share
  // one key unless they straddle a multiple of 2^32, which only an index_offset that is not a
  // multiple of 8 can cause: then each lane takes the scalar definition.
  static U random_bits(uint64_t seed, uint64_t index) {
    using simd_scalar::mix32;
    if (uint32_t(index) > 0xFFFFFFFFU - (W - 1)) {
      alignas(32) uint32_t r[W];
      for (int j = 0; j < W; ++j) r[j] = simd_scalar::Vec::random_bits(seed, index + j);
      return _mm256_load_si256(reinterpret_cast<const __m256i*>(r));
    }
    const uint32_t key = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + uint32_t(index >> 32) * 0x9E3779B9U));
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(index))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return mix32v(_mm256_xor_si256(idx, _mm256_set1_epi32(int(key))));
  }
};

}  // namespace simd_avx2
}  // namespace offload_engine
