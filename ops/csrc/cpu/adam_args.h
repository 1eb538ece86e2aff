// Plain-C++ description of one Adam/AdamW update over a contiguous range of elements.
//
// This header is shared by the per-ISA kernel translation units, which are compiled with
// different target flags; it therefore holds only plain data (no functions), so that no
// inline function can be emitted with AVX-512 code in one unit and picked by the linker
// for another (an ODR trap that would crash CPUs without AVX-512).
#pragma once
#include <cstdint>

namespace offload_engine {

// 16-bit storage types, distinguished by tag so kernels can overload loads and stores.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum class Rounding : int { kNearestEven = 0, kStochastic = 1 };

// Float32 coefficients of one step of Adam/AdamW, or of Lion when `lion` is set (then
// beta1 interpolates the update direction, beta2 the momentum, neg_step_size is -lr,
// decay the decoupled weight decay, and exp_avg_sq is absent). They are computed once in double precision and rounded
// to float32 (see adam_coefficients() in adam_op.cpp and in reference.py), so the kernel
// and the PyTorch reference multiply by the very same float32 values.
struct AdamCoeffs {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float neg_step_size;   // -lr / (1 - beta1^t)
  float inv_bc2_sqrt;    // 1 / sqrt(1 - beta2^t)
  float decay;           // AdamW: 1 - lr * weight_decay
  float l2;              // Adam: weight_decay added to the gradient as l2 * param
  float grad_scale;      // multiplies the gradient first (loss-scale unscale, clipping)
  bool adamw, use_l2, use_grad_scale, maximize, lion;
  Rounding rounding;
  uint64_t seed;         // stochastic rounding stream; element i draws hash(seed, index_offset + i)
  uint64_t index_offset; // index in the stream of the tensor's element 0 (a page segment's start)
};

// The coefficients of one step (adam_coeffs.cpp).
AdamCoeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                       bool adamw_mode, bool bias_correction, bool maximize, double grad_scale,
                       bool stochastic_rounding, int64_t seed, int64_t index_offset);
// Lion: no bias correction, decoupled weight decay, no eps, no exp_avg_sq.
AdamCoeffs make_lion_coeffs(double lr, double beta1, double beta2, double weight_decay, bool maximize,
                            double grad_scale, bool stochastic_rounding, int64_t seed, int64_t index_offset);

// One tensor's worth of update: param/grad of the given types, fp32 exp_avg/exp_avg_sq.
struct AdamTensorArgs {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  ElemType param_type, grad_type;
  AdamCoeffs coeffs;
};

// A code map with its nearest-code lookup (offload_engine/quant/maps.py: CodeLookup).
struct CodeTables {
  const float* map;      // value of each code
  const int32_t* lut;    // per key: candidate code << 24 | offset of the bucket's threshold
  int32_t min_exponent;  // biased fp32 exponent of the first non-tiny bucket
  int32_t mantissa_bits;
  int32_t keys_per_sign;
};

// A code map laid out for in-register lookups (the avx512vbmi path; plane_tables.cpp builds
// it). Every table is indexed by a byte, so a 64-byte vector of indices is looked up with
// `vpermi2b` on table registers instead of a gather:
//  - value_planes[k][c]: byte k of the float32 map[c] (maps of 16 codes are padded with 0);
//  - mid_planes[k][c]: byte k of the threshold above code c, (map[c] + map[c+1]) / 2 in
//    float32 as quant/maps.py's midpoints, +inf for the last code;
//  - candidate[key]: the code of the smallest value in the key's bucket of magnitudes. A
//    bucket holds at most one threshold, so the nearest code of x is
//    candidate + (x > mid[candidate]), exactly the count of thresholds below x that the
//    reference defines (NaN and |x| >= 1 land in the last bucket of their sign, as there).
//  - key(x), from the top 16 bits of x (sign, exponent, 7 mantissa bits) so that a vector
//    computes 32 keys: binade i = clamp(exponent - kPlaneFirstExponent, 0, 31) picks
//    shift[i] and offset[i]; key = (|x| top bits >> shift[i]) - offset[i], plus
//    keys_per_sign when x is negative and the map has negative codes. Each binade gets as
//    many mantissa bits (at most 7) as its thresholds need, so all keys fit 512 byte entries
//    where one split for every binade would need thousands.
struct PlaneCodeTables {
  alignas(64) uint8_t value_planes[4][256];
  alignas(64) uint8_t mid_planes[4][256];
  alignas(64) uint8_t candidate[512];
  alignas(64) int16_t shift[32];
  alignas(64) int16_t offset[32];
  int32_t keys_per_sign;
  bool negative_codes;  // false: every threshold is > 0, so a negative x (or NaN) gets code 0
};
constexpr int32_t kPlaneFirstExponent = 96;  // binade 0 holds every |x| < 2^(97-127), binade 31 |x| >= 1

// One tensor with block-quantized moments: codes (one byte each, or two per byte for 4-bit,
// padded to whole blocks) and one fp32 absmax per block for each of exp_avg and exp_avg_sq.
struct AdamBlockwiseArgs {
  void* param;
  const void* grad;
  ElemType param_type, grad_type;
  uint8_t* m_codes;
  float* m_absmax;
  uint8_t* v_codes;
  float* v_absmax;
  CodeTables m_tables, v_tables;
  // The same maps for in-register lookups, set only for the avx512vbmi path (null otherwise;
  // also null for a map they cannot hold, and then that path keeps the gathers).
  const PlaneCodeTables* m_planes;
  const PlaneCodeTables* v_planes;
  int bits;       // 8 or 4
  int64_t block;  // elements per block: a power of two, 64 .. kMaxBlock
  int64_t numel;
  AdamCoeffs coeffs;
};
constexpr int64_t kMaxBlock = 4096;

// Updates blocks [block_begin, block_end) of the tensor.
using AdamBlockwiseFn = void (*)(const AdamBlockwiseArgs&, int64_t block_begin, int64_t block_end);

// Updates elements [begin, end) of the tensor. `begin` must be a multiple of 64 so that a
// SIMD vector never straddles a tile boundary (tiles are handed out by the caller).
using AdamRangeFn = void (*)(const AdamTensorArgs&, int64_t begin, int64_t end);

}  // namespace offload_engine
