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

// fp32 moments, stored as they are. The 8-bit block-quantized state replaces this piece:
// a StateIO loads W moments as fp32 vectors and stores them back.
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

// Block-quantized moments of one block, as the StateIO of adam_vector: loads dequantize codes
// (value = map[code] * absmax), stores go to fp32 block buffers that are requantized once the
// whole block is updated (the new absmax needs every element first).
template <class V>
struct QuantBlockIO {
  const uint8_t* m_codes;  // unpacked codes of this block
  const uint8_t* v_codes;
  typename V::F m_absmax, v_absmax;
  const float* m_map;
  const float* v_map;
  float* m_out;
  float* v_out;
  typename V::F load_m(int64_t i) const { return V::mul(V::gather(m_map, V::load_u8(m_codes + i)), m_absmax); }
  typename V::F load_v(int64_t i) const { return V::mul(V::gather(v_map, V::load_u8(v_codes + i)), v_absmax); }
  void store(int64_t i, typename V::F mv, typename V::F vv) const { V::store(m_out + i, mv); V::store(v_out + i, vv); }
  void store_m(int64_t i, typename V::F mv) const { V::store(m_out + i, mv); }
};

// Requantizes `len` fp32 values of one block into codes[0, round_up(len, W)) (the caller
// zeroes the codes past len). A block whose absmax is zero or subnormal is flushed to the
// zero code (1 / absmax would overflow); reference.py's codec does the same.
template <class V>
inline void quantize_block(const float* values, int64_t len, float absmax, const CodeTables& t, uint8_t* codes) {
  constexpr int W = V::W;
  const typename V::F inv = V::set1(absmax >= 0x1p-126f ? 1.0f / absmax : 0.0f);
  for (int64_t i = 0; i < len; i += W) V::store_u8(codes + i, V::quantize(V::mul(V::load(values + i), inv), t));
}

// [Note: blockwise step] Per block: dequantize m and v, run the same Adam math as the fp32
// kernel (adam_vector), track the new absmax, then requantize, all in one pass over memory
// (the block's fp32 moments live in L1-resident stack buffers between the two halves).
template <class V, class P, class G>
void adam_blocks_typed(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  constexpr int W = V::W;
  using F = typename V::F;
  alignas(64) float m_buf[kMaxBlock], v_buf[kMaxBlock];
  alignas(64) uint8_t m_cb[kMaxBlock], v_cb[kMaxBlock];
  P* p = static_cast<P*>(a.param);
  const G* g = static_cast<const G*>(a.grad);
  const AdamConsts<V> c(a.coeffs);
  const int64_t B = a.block;
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t start = blk * B, len = std::min(B, a.numel - start);
    uint8_t* m_codes = a.bits == 8 ? a.m_codes + start : m_cb;  // 8-bit: codes used in place
    // Lion keeps only exp_avg: every exp_avg_sq access below is skipped (its pointers are null).
    const bool has_v = !c.lion;
    uint8_t* v_codes = a.bits == 8 && has_v ? a.v_codes + start : v_cb;
    if (a.bits == 4) {
      simd_scalar::unpack_nibbles(a.m_codes + start / 2, m_cb, B);
      if (has_v) simd_scalar::unpack_nibbles(a.v_codes + start / 2, v_cb, B);
    }
    const QuantBlockIO<V> io{m_codes, v_codes, V::set1(a.m_absmax[blk]), V::set1(has_v ? a.v_absmax[blk] : 0.0f),
                             a.m_tables.map, has_v ? a.v_tables.map : a.m_tables.map, m_buf, v_buf};
    F m_max = V::set1(0.0f), v_max = V::set1(0.0f);
    int64_t i = 0;
    for (; i + W <= len; i += W) {
      adam_vector<V>(p + start + i, g + start + i, io, i, start + i, c);
      m_max = V::max(V::abs(V::load(m_buf + i)), m_max);  // new value first: a NaN is ignored
      if (has_v) v_max = V::max(V::load(v_buf + i), v_max);
    }
    if (i < len) {  // tail of the last block: zero-padded param/grad copies, padded lanes zeroed
      const int64_t rest = len - i;
      P p_buf[W] = {}; G g_buf[W] = {};
      std::memcpy(p_buf, p + start + i, rest * sizeof(P));
      std::memcpy(g_buf, g + start + i, rest * sizeof(G));
      adam_vector<V>(p_buf, g_buf, io, i, start + i, c);
      std::memcpy(p + start + i, p_buf, rest * sizeof(P));
      std::memset(m_buf + i + rest, 0, (W - rest) * sizeof(float));
      std::memset(v_buf + i + rest, 0, (W - rest) * sizeof(float));
      m_max = V::max(V::abs(V::load(m_buf + i)), m_max);  // new value first: a NaN is ignored
      if (has_v) v_max = V::max(V::load(v_buf + i), v_max);
    }
    const float m_absmax = V::reduce_max(m_max), v_absmax = V::reduce_max(v_max);
    quantize_block<V>(m_buf, len, m_absmax, a.m_tables, m_codes);
    if (has_v) quantize_block<V>(v_buf, len, v_absmax, a.v_tables, v_codes);
    if (len < B) {  // padding codes past the tensor's end are 0 in storage
      std::memset(m_codes + len, 0, size_t(B - len));
      if (has_v) std::memset(v_codes + len, 0, size_t(B - len));
    }
    if (a.bits == 4) {
      simd_scalar::pack_nibbles(m_cb, a.m_codes + start / 2, B);
      if (has_v) simd_scalar::pack_nibbles(v_cb, a.v_codes + start / 2, B);
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

template <class V>
void adam_blocks(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  with_elem_types(a.param_type, a.grad_type, [&](auto* p, auto* g) {
    adam_blocks_typed<V, std::remove_pointer_t<decltype(p)>, std::remove_pointer_t<decltype(g)>>(a, block_begin,
                                                                                                block_end);
  });
}

template <class V>
void adam_range(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  with_elem_types(a.param_type, a.grad_type, [&](auto* p, auto* g) {
    adam_range_fp32_state<V, std::remove_pointer_t<decltype(p)>, std::remove_pointer_t<decltype(g)>>(a, begin, end);
  });
}

}  // namespace offload_engine
