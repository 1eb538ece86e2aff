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
};

// The step's constants broadcast into vector registers once per range. Kept as locals (not
// read through the AdamCoeffs reference) because the kernel's float stores could alias
// that struct, which would make the compiler reload and re-broadcast them every vector.
template <class V>
struct AdamConsts {
  using F = typename V::F;
  F beta1, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, inv_bc2_sqrt, decay, l2, grad_scale;
  bool adamw, use_l2, use_grad_scale, maximize, stochastic;
  uint64_t seed;
  explicit AdamConsts(const AdamCoeffs& c)
      : beta1(V::set1(c.beta1)), one_minus_beta1(V::set1(c.one_minus_beta1)), beta2(V::set1(c.beta2)),
        one_minus_beta2(V::set1(c.one_minus_beta2)), eps(V::set1(c.eps)), neg_step_size(V::set1(c.neg_step_size)),
        inv_bc2_sqrt(V::set1(c.inv_bc2_sqrt)), decay(V::set1(c.decay)), l2(V::set1(c.l2)),
        grad_scale(V::set1(c.grad_scale)), adamw(c.adamw), use_l2(c.use_l2), use_grad_scale(c.use_grad_scale),
        maximize(c.maximize), stochastic(c.rounding == Rounding::kStochastic), seed(c.seed) {}
};

// Updates W elements at p, g and state offset `si`; `index` is the element's index in the
// tensor (it keys the stochastic-rounding stream, so results do not depend on tiling).
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
  const F m = V::add(V::mul(state.load_m(si), c.beta1), V::mul(grad, c.one_minus_beta1));
  const F v = V::add(V::mul(state.load_v(si), c.beta2), V::mul(V::mul(grad, c.one_minus_beta2), grad));
  const F denom = V::add(V::mul(V::sqrt(v), c.inv_bc2_sqrt), c.eps);
  param = V::add(param, V::mul(V::div(m, denom), c.neg_step_size));
  state.store(si, m, v);
  if (c.stochastic) {
    V::store_sr(p, param, V::random_bits(c.seed, index));
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
    std::memcpy(v_buf, a.exp_avg_sq + i, rest * sizeof(float));
    adam_vector<V>(p_buf, g_buf, Fp32StateIO<V>{m_buf, v_buf}, 0, i, c);
    std::memcpy(p + i, p_buf, rest * sizeof(P));
    std::memcpy(a.exp_avg + i, m_buf, rest * sizeof(float));
    std::memcpy(a.exp_avg_sq + i, v_buf, rest * sizeof(float));
  }
}

// Picks the instantiation for the tensor's (param, grad) types.
template <class V>
void adam_range(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  auto with_grad = [&](auto* param_tag) {
    using P = std::remove_pointer_t<decltype(param_tag)>;
    switch (a.grad_type) {
      case ElemType::kFloat32: return adam_range_fp32_state<V, P, float>(a, begin, end);
      case ElemType::kBFloat16: return adam_range_fp32_state<V, P, bf16_t>(a, begin, end);
      case ElemType::kFloat16: return adam_range_fp32_state<V, P, f16_t>(a, begin, end);
    }
  };
  switch (a.param_type) {
    case ElemType::kFloat32: return with_grad(static_cast<float*>(nullptr));
    case ElemType::kBFloat16: return with_grad(static_cast<bf16_t*>(nullptr));
    case ElemType::kFloat16: return with_grad(static_cast<f16_t*>(nullptr));
  }
}

}  // namespace offload_engine
