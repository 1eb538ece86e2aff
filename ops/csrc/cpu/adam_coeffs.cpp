// The step's coefficients (AdamCoeffs), computed once per call by every op and device. Plain
// C++ without torch, so benchmarks/blockwise_breakdown.cpp builds the kernel with the same
// constants the ops pass.
#include "adam_args.h"

#include <cmath>

namespace offload_engine {

// [Note: coefficients] Computed in double, rounded once to float32. reference.py's
// adam_coefficients() does the same arithmetic, so both sides use identical constants.
AdamCoeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                       bool adamw_mode, bool bias_correction, bool maximize, double grad_scale,
                       bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, double(step)) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, double(step)) : 1.0;
  AdamCoeffs c{};
  c.beta1 = float(beta1);
  c.one_minus_beta1 = float(1.0 - beta1);
  c.beta2 = float(beta2);
  c.one_minus_beta2 = float(1.0 - beta2);
  c.eps = float(eps);
  c.neg_step_size = float(-(lr / bc1));
  c.inv_bc2_sqrt = float(1.0 / std::sqrt(bc2));
  c.decay = float(1.0 - lr * weight_decay);
  c.l2 = float(weight_decay);
  c.grad_scale = float(grad_scale);
  c.adamw = adamw_mode && weight_decay != 0.0;
  c.use_l2 = !adamw_mode && weight_decay != 0.0;
  c.use_grad_scale = grad_scale != 1.0;
  c.maximize = maximize;
  c.rounding = stochastic_rounding ? Rounding::kStochastic : Rounding::kNearestEven;
  c.seed = uint64_t(seed);
  c.index_offset = uint64_t(index_offset);  // checked >= 0; offset + index < 2^64 never wraps
  c.lion = false;
  return c;
}

AdamCoeffs make_lion_coeffs(double lr, double beta1, double beta2, double weight_decay, bool maximize,
                            double grad_scale, bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  AdamCoeffs c = make_coeffs(lr, beta1, beta2, /*eps=*/0.0, weight_decay, /*step=*/1, /*adamw_mode=*/true,
                             /*bias_correction=*/false, maximize, grad_scale, stochastic_rounding, seed, index_offset);
  c.neg_step_size = float(-lr);
  c.lion = true;
  return c;
}

}  // namespace offload_engine
