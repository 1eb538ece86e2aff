// The fused Adam/AdamW element update, written once over a vector type V (simd_*.h).
// Each ISA translation unit includes this after its `#pragma GCC target`, so the same
// source becomes the scalar, AVX2 and AVX-512 kernels.
//
// [Note: one update math] Every operation below is a separately rounded fp32 IEEE op
// (the build uses -ffp-contract=off, so no FMA contraction): the PyTorch reference in
// offload_engine/reference.py performs the same ops in the same order and reproduces the
// kernel bit for bit on every path. Change both together.
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>
#include "adam_args.h"

namespace offload_engine {

// fp32 moments, stored as they are: a StateIO loads W moments as fp32 vectors and stores them
// back. Block-quantized state uses it too, on the fp32 block buffers a codec fills and empties.
template <class V>
struct Fp32StateIO {
  float* m;
  float* v;
  typename V::F load_m(int64_t i) const { return V::load(m + i); }
  typename V::F load_v(int64_t i) const { return V::load(v + i); }
  void store(int64_t i, typename V::F mv, typename V::F vv) const { V::store(m + i, mv); V::store(v + i, vv); }
  void store_m(int64_t i, typename V::F mv) const { V::store(m + i, mv); }
};

// The step's constants broadcast into vector registers once per range. Kept as locals (not
// read through the AdamCoeffs reference) because the kernel's float stores could alias
// that struct, which would make the compiler reload and re-broadcast them every vector.
template <class V>
struct AdamConsts {
  using F = typename V::F;
  F beta1, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, inv_bc2_sqrt, decay, l2, grad_scale;
  bool adamw, use_l2, use_grad_scale, maximize, stochastic, lion;
  uint64_t seed, index_offset;
  explicit AdamConsts(const AdamCoeffs& c)
      : beta1(V::set1(c.beta1)), one_minus_beta1(V::set1(c.one_minus_beta1)), beta2(V::set1(c.beta2)),
        one_minus_beta2(V::set1(c.one_minus_beta2)), eps(V::set1(c.eps)), neg_step_size(V::set1(c.neg_step_size)),
        inv_bc2_sqrt(V::set1(c.inv_bc2_sqrt)), decay(V::set1(c.decay)), l2(V::set1(c.l2)),
        grad_scale(V::set1(c.grad_scale)), adamw(c.adamw), use_l2(c.use_l2), use_grad_scale(c.use_grad_scale),
        maximize(c.maximize), stochastic(c.rounding == Rounding::kStochastic), lion(c.lion), seed(c.seed),
        index_offset(c.index_offset) {}
};

// Updates W elements at p, g and state offset `si`; `index` is the element's index in the
// tensor. index_offset + index keys the stochastic-rounding stream, so results depend on
// neither tiling nor paging (a page segment passes its start in the param as index_offset).
template <class V, class P, class G, class S>
inline __attribute__((always_inline)) void adam_vector(P* p, const G* g, const S& state, int64_t si, int64_t index,
                                                        const AdamConsts<V>& c) {
  using F = typename V::F;
  F grad = V::load(g);
  if (c.use_grad_scale) grad = V::mul(grad, c.grad_scale);
  if (c.maximize) grad = V::neg(grad);
  F param = V::load(p);
  if (c.use_l2) grad = V::add(grad, V::mul(param, c.l2));
  if (c.adamw) param = V::mul(param, c.decay);
  if (c.lion) {  // Lion: step along the sign of an interpolation, then update the momentum
    const F m_old = state.load_m(si);
    const F direction = V::add(V::mul(m_old, c.beta1), V::mul(grad, c.one_minus_beta1));
    param = V::add(param, V::mul(V::sign(direction), c.neg_step_size));
    state.store_m(si, V::add(V::mul(m_old, c.beta2), V::mul(grad, c.one_minus_beta2)));
  } else {
    const F m = V::add(V::mul(state.load_m(si), c.beta1), V::mul(grad, c.one_minus_beta1));
    const F v = V::add(V::mul(state.load_v(si), c.beta2), V::mul(V::mul(grad, c.one_minus_beta2), grad));
    const F denom = V::add(V::mul(V::sqrt(v), c.inv_bc2_sqrt), c.eps);
    param = V::add(param, V::mul(V::div(m, denom), c.neg_step_size));
    state.store(si, m, v);
  }
  if (c.stochastic) {
    V::store_sr(p, param, V::random_bits(c.seed, c.index_offset + uint64_t(index)));
  } else {
    V::store(p, param);
  }
}

// Updates elements [begin, end). Full vectors run in place; a tail shorter than W is
// copied into zero-padded stack buffers, updated as one vector, and copied back, so tails
// of any length take the same code (and the same rounding) as the body.
template <class V, class P, class G>
void adam_range_fp32_state(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  P* p = static_cast<P*>(a.param);
  const G* g = static_cast<const G*>(a.grad);
  const Fp32StateIO<V> state{a.exp_avg, a.exp_avg_sq};
  const AdamConsts<V> c(a.coeffs);
  int64_t i = begin;
  for (; i + W <= end; i += W) adam_vector<V>(p + i, g + i, state, i, i, c);
  const int64_t rest = end - i;
  if (rest > 0) {
    P p_buf[W] = {}; G g_buf[W] = {}; float m_buf[W] = {}, v_buf[W] = {};
    std::memcpy(p_buf, p + i, rest * sizeof(P));
    std::memcpy(g_buf, g + i, rest * sizeof(G));
    std::memcpy(m_buf, a.exp_avg + i, rest * sizeof(float));
    if (!c.lion) std::memcpy(v_buf, a.exp_avg_sq + i, rest * sizeof(float));  // Lion has no exp_avg_sq
    adam_vector<V>(p_buf, g_buf, Fp32StateIO<V>{m_buf, v_buf}, 0, i, c);
    std::memcpy(p + i, p_buf, rest * sizeof(P));
    std::memcpy(a.exp_avg + i, m_buf, rest * sizeof(float));
    if (!c.lion) std::memcpy(a.exp_avg_sq + i, v_buf, rest * sizeof(float));
  }
}

// The block codec of every ISA: codes are looked up in the map with gathers and found with
// the CodeLookup table (one gather per vector each way). The avx512vbmi path replaces it with
// in-register byte-table lookups (quant_vbmi.h) that produce the same bits.
template <class V>
struct GatherCodec {
  static constexpr int64_t kChunk = 64;  // elements per quantize call (every codec's)
  // out[0, B) = map[code] * absmax for the block's B codes (4-bit: B/2 bytes, two per byte).
  static void dequantize(const uint8_t* codes, int bits, int64_t B, float absmax, const CodeTables& t,
                         const PlaneCodeTables*, float* out) {
    constexpr int W = V::W;
    alignas(64) uint8_t unpacked[kMaxBlock];
    if (bits == 4) {
      simd_scalar::unpack_nibbles(codes, unpacked, B);
      codes = unpacked;
    }
    const typename V::F scale = V::set1(absmax);
    for (int64_t i = 0; i < B; i += W) V::store(out + i, V::mul(V::gather(t.map, V::load_u8(codes + i)), scale));
  }
  // Finds the codes of kChunk values, each multiplied by inv (1 / the block's absmax).
  class Quantizer {
   public:
    Quantizer(const CodeTables& t, const PlaneCodeTables*) : t_(t) {}
    void operator()(const float* values, float inv, int bits, uint8_t* codes) const {
      constexpr int W = V::W;
      alignas(64) uint8_t unpacked[kChunk];
      uint8_t* out = bits == 4 ? unpacked : codes;
      const typename V::F scale = V::set1(inv);
      for (int64_t i = 0; i < kChunk; i += W) V::store_u8(out + i, V::quantize(V::mul(V::load(values + i), scale), t_));
      if (bits == 4) simd_scalar::pack_nibbles(unpacked, codes, kChunk);
    }

   private:
    const CodeTables& t_;
  };
};

// Codes past the tensor's end (in its last block) are 0 in storage, whatever they quantized to.
inline void zero_code_padding(uint8_t* codes, int bits, int64_t len, int64_t B) {
  if (bits == 8) {
    std::memset(codes + len, 0, size_t(B - len));
    return;
  }
  if (len % 2) codes[len / 2] &= 0x0F;  // element len-1 keeps the low nibble
  std::memset(codes + (len + 1) / 2, 0, size_t((B - len) / 2));
}

// 1 / absmax, or 0 for a block whose absmax is zero or subnormal (1 / absmax would overflow):
// such a block is flushed to the zero code, as reference.py's codec does.
inline float inverse_absmax(float absmax) { return absmax >= 0x1p-126f ? 1.0f / absmax : 0.0f; }

// [Note: blockwise step] Per block, three passes over L1-resident buffers: dequantize m and v
// into fp32, run the same Adam math as the fp32 kernel (adam_vector) on them in place while
// tracking the new absmax, then requantize (the new absmax needs every element first).
// (Interleaving one block's requantize with the next block's math, 64 elements at a time, so
// that the divider and the shuffle units overlap, measured 1.08x slower on Zen 4; the
// requantize is half the time: benchmarks/blockwise_breakdown.py.)
template <class V, class Codec, class P, class G>
void adam_blocks_typed(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  constexpr int W = V::W;
  constexpr int64_t kChunk = Codec::kChunk;
  using F = typename V::F;
  alignas(64) float m_buf[kMaxBlock], v_buf[kMaxBlock];
  P* p = static_cast<P*>(a.param);
  const G* g = static_cast<const G*>(a.grad);
  const AdamConsts<V> c(a.coeffs);
  const int64_t B = a.block;
  const int64_t block_bytes = B * a.bits / 8, chunk_bytes = kChunk * a.bits / 8;
  // Lion keeps only exp_avg: every exp_avg_sq access below is skipped (its pointers are null).
  const bool has_v = !c.lion;
  const typename Codec::Quantizer quantize_m(a.m_tables, a.m_planes);
  const typename Codec::Quantizer quantize_v(a.v_tables, a.v_planes);
  const Fp32StateIO<V> buffers{m_buf, v_buf};
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t start = blk * B, len = std::min(B, a.numel - start);
    uint8_t* m_codes = a.m_codes + blk * block_bytes;
    uint8_t* v_codes = has_v ? a.v_codes + blk * block_bytes : nullptr;
    Codec::dequantize(m_codes, a.bits, B, a.m_absmax[blk], a.m_tables, a.m_planes, m_buf);
    if (has_v) Codec::dequantize(v_codes, a.bits, B, a.v_absmax[blk], a.v_tables, a.v_planes, v_buf);
    F m_max = V::set1(0.0f), v_max = V::set1(0.0f);
    int64_t i = 0;
    for (; i + W <= len; i += W) {
      adam_vector<V>(p + start + i, g + start + i, buffers, i, start + i, c);
      m_max = V::max(V::abs(V::load(m_buf + i)), m_max);  // new value first: a NaN is ignored
      if (has_v) v_max = V::max(V::load(v_buf + i), v_max);
    }
    if (i < len) {  // tail of the last block: zero-padded param/grad copies
      const int64_t rest = len - i;
      P p_buf[W] = {}; G g_buf[W] = {};
      std::memcpy(p_buf, p + start + i, rest * sizeof(P));
      std::memcpy(g_buf, g + start + i, rest * sizeof(G));
      adam_vector<V>(p_buf, g_buf, buffers, i, start + i, c);
      std::memcpy(p + start + i, p_buf, rest * sizeof(P));
      std::memset(m_buf + i + rest, 0, (W - rest) * sizeof(float));
      std::memset(v_buf + i + rest, 0, (W - rest) * sizeof(float));
      m_max = V::max(V::abs(V::load(m_buf + i)), m_max);  // new value first: a NaN is ignored
      if (has_v) v_max = V::max(V::load(v_buf + i), v_max);
      i += W;
    }
    if (i < B) {  // past the tensor's end: zeros, so the codec sees whole chunks
      std::memset(m_buf + i, 0, (B - i) * sizeof(float));
      std::memset(v_buf + i, 0, (B - i) * sizeof(float));
    }
    const float m_absmax = V::reduce_max(m_max), v_absmax = V::reduce_max(v_max);
    const float m_inv = inverse_absmax(m_absmax), v_inv = inverse_absmax(v_absmax);
    for (int64_t j = 0; j < B; j += kChunk) {
      quantize_m(m_buf + j, m_inv, a.bits, m_codes + j / kChunk * chunk_bytes);
      if (has_v) quantize_v(v_buf + j, v_inv, a.bits, v_codes + j / kChunk * chunk_bytes);
    }
    if (len < B) {
      zero_code_padding(m_codes, a.bits, len, B);
      if (has_v) zero_code_padding(v_codes, a.bits, len, B);
    }
    a.m_absmax[blk] = m_absmax;
    if (has_v) a.v_absmax[blk] = v_absmax;
  }
}

// Calls fn(P*, G*) with null pointers of the element types of the tensor's param and grad,
// so one switch picks the template instantiation for every kernel below.
template <class Fn>
inline void with_elem_types(ElemType param_type, ElemType grad_type, Fn&& fn) {
  auto with_grad = [&](auto* param_tag) {
    switch (grad_type) {
      case ElemType::kFloat32: return fn(param_tag, static_cast<float*>(nullptr));
      case ElemType::kBFloat16: return fn(param_tag, static_cast<bf16_t*>(nullptr));
      case ElemType::kFloat16: return fn(param_tag, static_cast<f16_t*>(nullptr));
    }
  };
  switch (param_type) {
    case ElemType::kFloat32: return with_grad(static_cast<float*>(nullptr));
    case ElemType::kBFloat16: return with_grad(static_cast<bf16_t*>(nullptr));
    case ElemType::kFloat16: return with_grad(static_cast<f16_t*>(nullptr));
  }
}

template <class V, class Codec = GatherCodec<V>>
void adam_blocks(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  with_elem_types(a.param_type, a.grad_type, [&](auto* p, auto* g) {
    adam_blocks_typed<V, Codec, std::remove_pointer_t<decltype(p)>, std::remove_pointer_t<decltype(g)>>(
        a, block_begin, block_end);
  });
}

template <class V>
void adam_range(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  with_elem_types(a.param_type, a.grad_type, [&](auto* p, auto* g) {
    adam_range_fp32_state<V, std::remove_pointer_t<decltype(p)>, std::remove_pointer_t<decltype(g)>>(a, begin, end);
  });
}

}  // namespace offload_engine
