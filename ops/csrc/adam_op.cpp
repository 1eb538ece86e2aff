// The Adam/AdamW and Lion steps as torch.library ops: declared once here, implemented for CPU
// (the SIMD kernels) and Meta (checks only, for FakeTensor tracing). The CUDA implementation
// registers under the same schemas from ops/csrc/cuda/adam_cuda_op.cpp (CUDA builds only).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>

#include "adam_op_common.h"
#include "cpu/adam_args.h"
#include "cpu/simd_dispatch.h"

namespace offload_engine {
namespace {

// A multiple of every SIMD width, so no vector straddles a tile. (A vector may straddle the
// 2^32-element boundary where the stochastic-rounding key changes when index_offset is not a
// multiple of its width; random_bits handles that case lane by lane.)
constexpr int64_t kTileElems = 16384;
constexpr int64_t kTilesPerTask = 4;   // at::parallel_for grain: 64K elements before splitting across threads

void run_tiles(const AdamTensorArgs& args, int64_t n) {
  const AdamRangeFn range_fn = adam_range_for(selected_simd_path());
  const int64_t tiles = (n + kTileElems - 1) / kTileElems;
  // Tiles are disjoint, so the threads of ATen's pool (OpenMP, torch.get_num_threads()
  // of them) write without synchronisation; parallel_for joins before returning.
  at::parallel_for(0, tiles, kTilesPerTask, [&](int64_t t0, int64_t t1) {
    range_fn(args, t0 * kTileElems, std::min(t1 * kTileElems, n));
  });
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step, bool adamw_mode, bool bias_correction, bool maximize,
                   double grad_scale, bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                  index_offset);
  check_kernel_device("adam_step_", "CPU", param, c10::DeviceType::CPU);
  selected_simd_path();  // a bad OFFLOAD_ENGINE_SIMD is refused before anything is written
  const int64_t n = param.numel();
  if (n == 0) return;
  run_tiles(fp32_state_args("adam_step_", param, grad, exp_avg, &exp_avg_sq,
                            make_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction,
                                        maximize, grad_scale, stochastic_rounding, seed, index_offset)),
            n);
}

void lion_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, double lr,
                   double beta1, double beta2, double weight_decay, bool maximize, double grad_scale,
                   bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_lion_args(param, grad, exp_avg, lr, beta1, beta2, weight_decay, grad_scale, index_offset);
  check_kernel_device("lion_step_", "CPU", param, c10::DeviceType::CPU);
  selected_simd_path();
  const int64_t n = param.numel();
  if (n == 0) return;
  run_tiles(fp32_state_args("lion_step_", param, grad, exp_avg, nullptr,
                            make_lion_coeffs(lr, beta1, beta2, weight_decay, maximize, grad_scale,
                                             stochastic_rounding, seed, index_offset)),
            n);
}

void lion_step_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, double lr,
                    double beta1, double beta2, double weight_decay, bool, double grad_scale, bool, int64_t,
                    int64_t index_offset) {
  check_lion_args(param, grad, exp_avg, lr, beta1, beta2, weight_decay, grad_scale, index_offset);
}

void adam_step_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, bool, bool, bool, double grad_scale, bool, int64_t,
                    int64_t index_offset) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                  index_offset);
}

}  // namespace

TORCH_LIBRARY(offload_engine, m) {
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, int step, bool adamw_mode=True, "
      "bool bias_correction=True, bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, "
      "int seed=0, int index_offset=0) -> ()");
  m.def(
      "lion_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, *, float lr, float beta1, float beta2, "
      "float weight_decay, bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, int seed=0, "
      "int index_offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(offload_engine, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("lion_step_", &lion_step_cpu);
}
TORCH_LIBRARY_IMPL(offload_engine, Meta, m) {
  m.impl("adam_step_", &adam_step_meta);
  m.impl("lion_step_", &lion_step_meta);
}

}  // namespace offload_engine
