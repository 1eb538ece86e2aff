// Block codec of the avx512vbmi path: the map, its thresholds and the nearest-code candidates
// are byte tables held in vector registers (PlaneCodeTables, adam_args.h), looked up 64
// elements at a time with vpermi2b instead of one gather per 16. Include only after
// `#pragma GCC target` with avx512f, avx512bw and avx512vbmi (adam_avx512vbmi.cpp). Codes and
// values equal GatherCodec's bit for bit (tests/test_adam_blockwise_kernel.py runs both).
#pragma once
#include <immintrin.h>
#include <cstdint>
#include "adam_args.h"
#include "simd_scalar.h"

namespace offload_engine {
namespace quant_vbmi {

// [Note: lane order] _mm512_unpack{lo,hi}_epi{8,16} interleave within 128-bit lanes, so the
// four fp32 vectors assembled from byte planes hold elements in a shuffled order. Feeding
// the lookup indices in lane order undoes it: index byte p holds element lane_element(p).
// The map is its own inverse, so the same vpermb takes lane-order bytes back to natural order.
constexpr int lane_element(int p) { return 16 * ((p >> 2) & 3) + 4 * (p >> 4) + (p & 3); }

struct alignas(64) ByteIndex {
  uint8_t at[64];
};
template <class Fn>
constexpr ByteIndex byte_index(Fn fn) {
  ByteIndex t{};
  for (int p = 0; p < 64; ++p) t.at[p] = uint8_t(fn(p));
  return t;
}
constexpr ByteIndex kLaneOrder = byte_index([](int p) { return lane_element(p); });
// 4-bit codes: byte p reads packed byte lane_element(p) / 2 (its high nibble when the element is odd).
constexpr ByteIndex kNibbleByte = byte_index([](int p) { return lane_element(p) / 2; });
// Byte p reads the low byte of word lane_element(p) of two vectors of 32 words (+1: the high byte).
constexpr ByteIndex kKeyByte = byte_index([](int p) { return 2 * lane_element(p); });

inline __m512i load_index(const ByteIndex& t) { return _mm512_load_si512(t.at); }
inline __m512i lane_order() { return load_index(kLaneOrder); }

// [Note: tables in registers] The tables are loaded into locals once per block (dequantize)
// or once per task (Quantizer) rather than read through the pointer at each use, where every
// code store (a uint8_t* may alias anything) would make the compiler reload them. Measured
// about even on Zen 4, whose loads keep up; it keeps the lookups free of memory operands.

// A 256-byte table in four registers, looked up by 64 byte indices.
struct Table256 {
  __m512i q[4];
  explicit Table256(const uint8_t* t) {
    for (int j = 0; j < 4; ++j) q[j] = _mm512_load_si512(t + 64 * j);
  }
  // upper: bit 7 of each index (entries 128..255).
  __m512i lookup(__m512i idx, __mmask64 upper) const {
    return _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(q[0], idx, q[1]),
                                  _mm512_permutex2var_epi8(q[2], idx, q[3]));
  }
};

// A table of 256 float32 stored as four byte planes (plane k holds byte k of every entry).
struct Planes {
  Table256 plane[4];
  explicit Planes(const uint8_t (*p)[256]) : plane{Table256(p[0]), Table256(p[1]), Table256(p[2]), Table256(p[3])} {}
  // The entries at the 64 indices of idx (in lane order), as four vectors of 16 in natural order.
  void lookup(__m512i idx, __m512 out[4]) const {
    const __mmask64 upper = _mm512_movepi8_mask(idx);
    __m512i b[4];
    for (int k = 0; k < 4; ++k) b[k] = plane[k].lookup(idx, upper);
    const __m512i b01_lo = _mm512_unpacklo_epi8(b[0], b[1]), b01_hi = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i b23_lo = _mm512_unpacklo_epi8(b[2], b[3]), b23_hi = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(b01_lo, b23_lo));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(b01_lo, b23_lo));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(b01_hi, b23_hi));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(b01_hi, b23_hi));
  }
};

// 64 codes (in lane order) of the 64 elements at codes: 8-bit codes are bytes; 4-bit codes
// are nibbles, element 2k in the low nibble of byte k (32 bytes).
inline __m512i load_codes_lane_order(const uint8_t* codes, int bits) {
  if (bits == 8) return _mm512_permutexvar_epi8(lane_order(), _mm512_loadu_si512(codes));
  const __m512i x = _mm512_permutexvar_epi8(
      load_index(kNibbleByte), _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))));
  // Per-byte >> 4 through 16-bit shifts: the & 0x0F drops the bits pulled in from the neighbour.
  const __mmask64 odd = 0xAAAAAAAAAAAAAAAAULL;  // lane_element(p) is odd exactly when p is
  return _mm512_and_si512(_mm512_mask_blend_epi8(odd, x, _mm512_srli_epi16(x, 4)), _mm512_set1_epi8(0x0F));
}

// Stores 64 codes given in natural order (8-bit: 64 bytes; 4-bit: 32 bytes of nibble pairs).
inline void store_codes(uint8_t* codes, __m512i c, int bits) {
  if (bits == 8) {
    _mm512_storeu_si512(codes, c);
    return;
  }
  const __m512i pairs = _mm512_maddubs_epi16(c, _mm512_set1_epi16(0x1001));  // even + 16 * odd
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm512_cvtepi16_epi8(pairs));
}

// Everything quantize64 looks up, in registers (see [Note: tables in registers]).
struct QuantizeTables {
  Table256 candidate_low, candidate_high;  // candidate[0, 256) and [256, 512)
  Planes mid;
  __m512i shift, offset, keys_per_sign;
  bool negative_codes;
  bool over_256_keys;  // false (the 4-bit maps): bit 8 of every key is 0, its lookups are skipped
  explicit QuantizeTables(const PlaneCodeTables& t)
      : candidate_low(t.candidate), candidate_high(t.candidate + 256), mid(t.mid_planes),
        shift(_mm512_load_si512(t.shift)), offset(_mm512_load_si512(t.offset)),
        keys_per_sign(_mm512_set1_epi16(int16_t(t.keys_per_sign))), negative_codes(t.negative_codes),
        over_256_keys(t.keys_per_sign * (t.negative_codes ? 2 : 1) > 256) {}
};

// The lookup keys (see PlaneCodeTables) of 32 floats given by their top 16 bits.
inline __m512i lookup_keys(__m512i top, const QuantizeTables& t) {
  const __m512i magnitude = _mm512_and_si512(top, _mm512_set1_epi16(0x7FFF));
  // Binade: exponent - kPlaneFirstExponent clamped to [0, 31] (saturating subtract, then min).
  const __m512i binade = _mm512_min_epu16(
      _mm512_subs_epu16(_mm512_srli_epi16(magnitude, 7), _mm512_set1_epi16(kPlaneFirstExponent)), _mm512_set1_epi16(31));
  const __m512i key = _mm512_sub_epi16(_mm512_srlv_epi16(magnitude, _mm512_permutexvar_epi16(binade, t.shift)),
                                       _mm512_permutexvar_epi16(binade, t.offset));
  if (!t.negative_codes) return key;
  return _mm512_mask_add_epi16(key, _mm512_movepi16_mask(top), key, t.keys_per_sign);
}

// The top 16 bits of four vectors of 16 floats, as two vectors of 32 words (natural order).
inline void top_halves(const __m512 x[4], __m512i top[2]) {
  alignas(64) static constexpr uint16_t kOddWords[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                         23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                         45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i idx = _mm512_load_si512(kOddWords);
  top[0] = _mm512_permutex2var_epi16(_mm512_castps_si512(x[0]), idx, _mm512_castps_si512(x[1]));
  top[1] = _mm512_permutex2var_epi16(_mm512_castps_si512(x[2]), idx, _mm512_castps_si512(x[3]));
}

// Nearest codes (natural order) of the 64 floats values[0, 64) * inv.
inline __m512i quantize64(const float* values, __m512 inv, const QuantizeTables& t) {
  __m512 x[4];
  for (int q = 0; q < 4; ++q) x[q] = _mm512_mul_ps(_mm512_loadu_ps(values + 16 * q), inv);
  __m512i top[2];
  top_halves(x, top);
  const __m512i k0 = lookup_keys(top[0], t), k1 = lookup_keys(top[1], t);
  const __m512i key_byte = load_index(kKeyByte);
  const __m512i low = _mm512_permutex2var_epi8(k0, key_byte, k1);
  const __mmask64 bit7 = _mm512_movepi8_mask(low);
  __m512i candidate = t.candidate_low.lookup(low, bit7);
  if (t.over_256_keys) {
    const __m512i high = _mm512_permutex2var_epi8(k0, _mm512_add_epi8(key_byte, _mm512_set1_epi8(1)), k1);
    candidate = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(high, high), candidate, t.candidate_high.lookup(low, bit7));
  }
  __m512 mid[4];
  t.mid.lookup(candidate, mid);
  // Up one code where x lies above the bucket's threshold (NaN never does).
  const __mmask64 up = _mm512_kunpackd(
      _mm512_kunpackw(_mm512_cmp_ps_mask(x[3], mid[3], _CMP_GT_OQ), _mm512_cmp_ps_mask(x[2], mid[2], _CMP_GT_OQ)),
      _mm512_kunpackw(_mm512_cmp_ps_mask(x[1], mid[1], _CMP_GT_OQ), _mm512_cmp_ps_mask(x[0], mid[0], _CMP_GT_OQ)));
  __m512i codes = _mm512_permutexvar_epi8(lane_order(), candidate);
  codes = _mm512_mask_add_epi8(codes, up, codes, _mm512_set1_epi8(1));
  if (!t.negative_codes) {  // every threshold is positive: negative x (and -0, negative NaN) get code 0
    const __mmask64 negative = _mm512_kunpackd(_mm512_movepi16_mask(top[1]), _mm512_movepi16_mask(top[0]));
    codes = _mm512_mask_mov_epi8(codes, negative, _mm512_setzero_si512());
  }
  return codes;
}

// GatherCodec's interface (adam_kernel.h) on these tables. B is a multiple of 64.
struct Codec {
  static void dequantize(const uint8_t* codes, int bits, int64_t B, float absmax, const CodeTables&,
                         const PlaneCodeTables* t, float* out) {
    const __m512 scale = _mm512_set1_ps(absmax);
    const Planes values(t->value_planes);
    for (int64_t i = 0; i < B; i += 64) {
      __m512 v[4];
      values.lookup(load_codes_lane_order(codes + i * bits / 8, bits), v);
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + i + 16 * q, _mm512_mul_ps(v[q], scale));
    }
  }
  static constexpr int64_t kChunk = 64;
  class Quantizer {
   public:
    Quantizer(const CodeTables&, const PlaneCodeTables* t) : tables_(*t) {}
    void operator()(const float* values, float inv, int bits, uint8_t* codes) const {
      store_codes(codes, quantize64(values, _mm512_set1_ps(inv), tables_), bits);
    }

   private:
    QuantizeTables tables_;
  };
};

}  // namespace quant_vbmi
}  // namespace offload_engine
