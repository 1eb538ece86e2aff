// The Adam/AdamW step as a torch.library op: declared once here, implemented for CPU (the
// SIMD kernels) and Meta (checks only, for FakeTensor tracing). The CUDA implementation
// registers under the same schema from ops/csrc/cuda.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/adam_args.h"
#include "cpu/simd_dispatch.h"

namespace offload_engine {
namespace {

// A multiple of every SIMD width (and a divisor of 2^32), so no vector straddles a tile or the
// 2^32-element boundary where the stochastic-rounding key changes.
constexpr int64_t kTileElems = 16384;
constexpr int64_t kTilesPerTask = 4;   // at::parallel_for grain: 64K elements before splitting across threads

ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kBFloat16: return ElemType::kBFloat16;
    case at::kHalf: return ElemType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "adam_step_: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Every check runs before any element is written, so a rejected call changes nothing.
void check_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step, double grad_scale) {
  TORCH_CHECK_VALUE(lr >= 0.0 && std::isfinite(lr), "adam_step_: lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), "adam_step_: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "adam_step_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "adam_step_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(weight_decay >= 0.0 && std::isfinite(weight_decay),
                    "adam_step_: weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(step >= 1, "adam_step_: step must be >= 1 (the count including this step), got ", step);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), "adam_step_: grad_scale must be finite, got ", grad_scale);

  elem_type(param, "param");
  elem_type(grad, "grad");
  TORCH_CHECK_TYPE(exp_avg.scalar_type() == at::kFloat, "adam_step_: exp_avg must be float32, got ", exp_avg.scalar_type());
  TORCH_CHECK_TYPE(exp_avg_sq.scalar_type() == at::kFloat, "adam_step_: exp_avg_sq must be float32, got ",
                   exp_avg_sq.scalar_type());

  const std::pair<const char*, const at::Tensor*> others[] = {{"grad", &grad}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->device() == param.device(), "adam_step_: ", name, " is on ", t->device(),
                      " but param is on ", param.device());
    // sym_* accessors: the Meta kernel also runs under dynamic shapes (torch.compile, opcheck).
    TORCH_CHECK_VALUE(t->sym_sizes() == param.sym_sizes(), "adam_step_: ", name, " has shape ", t->sym_sizes(),
                      " but param has shape ", param.sym_sizes());
  }
  const std::pair<const char*, const at::Tensor*> all[] = {{"param", &param}, {"grad", &grad}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK_VALUE(t->is_contiguous(), "adam_step_: ", name, " must be contiguous, got strides ", t->sym_strides());
  }
  if (param.device().type() != c10::DeviceType::Meta && param.numel() > 0) {
    TORCH_CHECK_VALUE(param.data_ptr() != exp_avg.data_ptr() && param.data_ptr() != exp_avg_sq.data_ptr() &&
                          exp_avg.data_ptr() != exp_avg_sq.data_ptr(),
                      "adam_step_: param, exp_avg and exp_avg_sq must be distinct tensors");
  }
}

// [Note: coefficients] Computed in double, rounded once to float32. reference.py's
// adam_coefficients() does the same arithmetic, so both sides use identical constants.
AdamCoeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                       bool adamw_mode, bool bias_correction, bool maximize, double grad_scale,
                       bool stochastic_rounding, int64_t seed) {
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
  return c;
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step, bool adamw_mode, bool bias_correction, bool maximize,
                   double grad_scale, bool stochastic_rounding, int64_t seed) {
  check_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  TORCH_CHECK_VALUE(param.device().is_cpu(), "adam_step_: the CPU kernel got param on ", param.device());
  const AdamRangeFn range_fn = adam_range_for(selected_simd_path());
  const int64_t n = param.numel();
  if (n == 0) return;
  AdamTensorArgs args{param.data_ptr(), grad.const_data_ptr(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                      elem_type(param, "param"), elem_type(grad, "grad"),
                      make_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, maximize,
                                  grad_scale, stochastic_rounding, seed)};
  const int64_t tiles = (n + kTileElems - 1) / kTileElems;
  // Tiles are disjoint, so the threads of ATen's pool (OpenMP, torch.get_num_threads()
  // of them) write without synchronisation; parallel_for joins before returning.
  at::parallel_for(0, tiles, kTilesPerTask, [&](int64_t t0, int64_t t1) {
    range_fn(args, t0 * kTileElems, std::min(t1 * kTileElems, n));
  });
}

void adam_step_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, bool, bool, bool, double grad_scale, bool, int64_t) {
  check_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
}

}  // namespace

TORCH_LIBRARY(offload_engine, m) {
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, int step, bool adamw_mode=True, "
      "bool bias_correction=True, bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, "
      "int seed=0) -> ()");
}

TORCH_LIBRARY_IMPL(offload_engine, CPU, m) { m.impl("adam_step_", &adam_step_cpu); }
TORCH_LIBRARY_IMPL(offload_engine, Meta, m) { m.impl("adam_step_", &adam_step_meta); }

}  // namespace offload_engine
