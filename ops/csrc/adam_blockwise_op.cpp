// Adam/AdamW with block-quantized moments (8-bit or 4-bit codes + one fp32 absmax per block)
// as a torch.library op, in the same library as adam_step_. The code tables come from
// offload_engine/quant (one definition of the maps and lookups, built in Python).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "adam_blockwise_common.h"
#include "adam_op_common.h"
#include "cpu/adam_args.h"
#include "cpu/plane_tables.h"
#include "cpu/simd_dispatch.h"

namespace offload_engine {
namespace {

constexpr const char* kOp = kBlockwiseOp;
constexpr const char* kLionOp = kLionBlockwiseOp;
constexpr int64_t kElemsPerTask = 65536;  // at::parallel_for grain, in elements (whole blocks)

void run_blocks(AdamBlockwiseArgs args) {
  const SimdPath path = selected_simd_path();
  const AdamBlockwiseFn blocks_fn = adam_blocks_for(path);
  if (path == SimdPath::kAvx512Vbmi) {  // built once per map, before the threads start
    args.m_planes = plane_code_tables(args.m_tables.map, 1 << args.bits);
    // Lion has no exp_avg_sq: its v tables repeat the m tables (never read), and so do these.
    args.v_planes = args.coeffs.lion ? args.m_planes : plane_code_tables(args.v_tables.map, 1 << args.bits);
  }
  const int64_t n_blocks = (args.numel + args.block - 1) / args.block;
  // Blocks are disjoint (codes, absmax and params), so the threads of torch's pool write
  // without synchronisation; parallel_for joins before returning.
  at::parallel_for(0, n_blocks, std::max<int64_t>(1, kElemsPerTask / args.block),
                   [&](int64_t b0, int64_t b1) { blocks_fn(args, b0, b1); });
}

void adam_step_blockwise_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                             const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                             const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                             const at::Tensor& v_lut,
                             c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                             double beta2, double eps, double weight_decay, int64_t step, bool adamw_mode,
                             bool bias_correction, bool maximize, double grad_scale, bool stochastic_rounding,
                             int64_t seed, int64_t index_offset) {
  check_adam_blockwise_args(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut,
                            lut_params, bits, block, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                            index_offset);
  check_kernel_device(kOp, "CPU", param, c10::DeviceType::CPU);
  if (param.numel() == 0) return;
  run_blocks(adam_blockwise_args(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut,
                                 lut_params, bits, block,
                                 make_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction,
                                             maximize, grad_scale, stochastic_rounding, seed, index_offset)));
}

void lion_step_blockwise_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                             const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                             c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                             double beta2, double weight_decay, bool maximize, double grad_scale,
                             bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_lion_blockwise_args(param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block, lr, beta1, beta2,
                            weight_decay, grad_scale, index_offset);
  check_kernel_device(kLionOp, "CPU", param, c10::DeviceType::CPU);
  if (param.numel() == 0) return;
  run_blocks(lion_blockwise_args(param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block,
                                 make_lion_coeffs(lr, beta1, beta2, weight_decay, maximize, grad_scale,
                                                  stochastic_rounding, seed, index_offset)));
}

void lion_step_blockwise_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                              const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                              c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                              double beta2, double weight_decay, bool, double grad_scale, bool, int64_t,
                              int64_t index_offset) {
  check_lion_blockwise_args(param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block, lr, beta1, beta2,
                            weight_decay, grad_scale, index_offset);
}

void adam_step_blockwise_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                              const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                              const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                              const at::Tensor& v_lut,
                              c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                              double beta2, double eps, double weight_decay, int64_t step, bool, bool, bool,
                              double grad_scale, bool, int64_t, int64_t index_offset) {
  check_adam_blockwise_args(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut,
                            lut_params, bits, block, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                            index_offset);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(offload_engine, m) {
  m.def(
      "adam_step_blockwise_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, "
      "Tensor(d!) v_codes, Tensor(e!) v_absmax, Tensor m_map, Tensor m_lut, Tensor v_map, Tensor v_lut, "
      "int[] lut_params, *, int bits, int block, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step, bool adamw_mode=True, bool bias_correction=True, "
      "bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, int seed=0, "
      "int index_offset=0) -> ()");
  m.def(
      "lion_step_blockwise_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, Tensor m_map, "
      "Tensor m_lut, int[] lut_params, *, int bits, int block, float lr, float beta1, float beta2, "
      "float weight_decay, bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, int seed=0, "
      "int index_offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(offload_engine, CPU, m) {
  m.impl("adam_step_blockwise_", &adam_step_blockwise_cpu);
  m.impl("lion_step_blockwise_", &lion_step_blockwise_cpu);
}
TORCH_LIBRARY_IMPL(offload_engine, Meta, m) {
  m.impl("adam_step_blockwise_", &adam_step_blockwise_meta);
  m.impl("lion_step_blockwise_", &lion_step_blockwise_meta);
}

}  // namespace offload_engine
