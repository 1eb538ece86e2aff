// Adam/AdamW with block-quantized moments (8-bit or 4-bit codes + one fp32 absmax per block)
// as a torch.library op, in the same library as adam_step_. The code tables come from
// offload_engine/quant (one definition of the maps and lookups, built in Python).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "adam_op_common.h"
#include "cpu/adam_args.h"
#include "cpu/simd_dispatch.h"

namespace offload_engine {
namespace {

constexpr const char* kOp = "adam_step_blockwise_";
constexpr const char* kLionOp = "lion_step_blockwise_";
constexpr int64_t kElemsPerTask = 65536;  // at::parallel_for grain, in elements (whole blocks)

void run_blocks(const AdamBlockwiseArgs& args) {
  const AdamBlockwiseFn blocks_fn = adam_blocks_for(selected_simd_path());
  const int64_t n_blocks = (args.numel + args.block - 1) / args.block;
  // Blocks are disjoint (codes, absmax and params), so the threads of torch's pool write
  // without synchronisation; parallel_for joins before returning.
  at::parallel_for(0, n_blocks, std::max<int64_t>(1, kElemsPerTask / args.block),
                   [&](int64_t b0, int64_t b1) { blocks_fn(args, b0, b1); });
}

void check_tables(const char* name, const at::Tensor& map, const at::Tensor& lut, int64_t min_exponent,
                  int64_t mantissa_bits, int64_t bits) {
  const int64_t codes = int64_t(1) << bits;
  TORCH_CHECK_TYPE(map.scalar_type() == at::kFloat, kOp, ": ", name, "_map must be float32, got ", map.scalar_type());
  TORCH_CHECK_VALUE(map.dim() == 1 && map.sym_numel() == codes && map.is_contiguous(), kOp, ": ", name,
                    "_map must be a contiguous 1-D tensor of ", codes, " values for ", bits, "-bit codes, got shape ",
                    map.sym_sizes());
  TORCH_CHECK_VALUE(mantissa_bits >= 0 && mantissa_bits <= 11 && min_exponent >= 1 && min_exponent <= 127, kOp, ": ",
                    name, " lookup parameters out of range (min_exponent ", min_exponent, ", mantissa_bits ",
                    mantissa_bits, ")");
  const int64_t keys = 2 * (1 + ((128 - min_exponent) << mantissa_bits));
  TORCH_CHECK_TYPE(lut.scalar_type() == at::kInt, kOp, ": ", name, "_lut must be int32, got ", lut.scalar_type());
  TORCH_CHECK_VALUE(lut.dim() == 1 && lut.is_contiguous() && lut.sym_numel() == keys, kOp, ": ", name,
                    "_lut must be a contiguous 1-D int32 tensor of ", keys, " entries, got ", lut.sym_sizes());
}

void check_state(const char* name, const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& param,
                 int64_t bits, int64_t block) {
  // SymInt arithmetic: under dynamic shapes (opcheck, torch.compile) sizes are symbolic.
  const c10::SymInt n = param.sym_numel();
  const c10::SymInt blocks = (n + block - 1) / block;
  const c10::SymInt code_bytes = blocks * block * bits / 8;
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, kOp, ": ", name, "_codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 1 && codes.sym_numel() == code_bytes && codes.is_contiguous(), kOp, ": ", name,
                    "_codes must be a contiguous 1-D tensor of ", code_bytes, " bytes (", blocks, " blocks of ", block,
                    " ", bits, "-bit codes), got shape ", codes.sym_sizes());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, kOp, ": ", name, "_absmax must be float32, got ",
                   absmax.scalar_type());
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.sym_numel() == blocks && absmax.is_contiguous(), kOp, ": ", name,
                    "_absmax must be a contiguous 1-D tensor of ", blocks, " values, got shape ", absmax.sym_sizes());
  for (const at::Tensor* t : {&codes, &absmax}) {
    TORCH_CHECK_VALUE(t->device() == param.device(), kOp, ": ", name, " state is on ", t->device(),
                      " but param is on ", param.device());
  }
}

void check_format(int64_t bits, int64_t block, c10::IntArrayRef lut_params, size_t n_params) {
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, kOp, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK_VALUE(block >= 64 && block <= kMaxBlock && (block & (block - 1)) == 0, kOp,
                    ": block must be a power of two from 64 to ", kMaxBlock, ", got ", block);
  TORCH_CHECK_VALUE(lut_params.size() == n_params, kOp, ": lut_params must hold ", n_params,
                    " values (min_exponent, mantissa_bits per map)");
}

void check_all(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes, const at::Tensor& m_absmax,
               const at::Tensor& v_codes, const at::Tensor& v_absmax, const at::Tensor& m_map,
               const at::Tensor& m_lut, const at::Tensor& v_map, const at::Tensor& v_lut,
               c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1, double beta2,
               double eps, double weight_decay, int64_t step, double grad_scale) {
  check_hyperparameters(kOp, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  check_param_grad(kOp, param, grad);
  check_format(bits, block, lut_params, 4);
  check_state("m", m_codes, m_absmax, param, bits, block);
  check_state("v", v_codes, v_absmax, param, bits, block);
  check_tables("m", m_map, m_lut, lut_params[0], lut_params[1], bits);
  check_tables("v", v_map, v_lut, lut_params[2], lut_params[3], bits);
  if (param.device().type() != c10::DeviceType::Meta && param.numel() > 0) {
    TORCH_CHECK_VALUE(m_codes.data_ptr() != v_codes.data_ptr() && m_absmax.data_ptr() != v_absmax.data_ptr(), kOp,
                      ": exp_avg and exp_avg_sq state must be distinct tensors");
  }
}

CodeTables tables(const at::Tensor& map, const at::Tensor& lut, int64_t min_exponent, int64_t mantissa_bits) {
  return CodeTables{map.const_data_ptr<float>(), lut.const_data_ptr<int32_t>(),
                    int32_t(min_exponent), int32_t(mantissa_bits),
                    int32_t(1 + ((128 - min_exponent) << mantissa_bits))};
}

void adam_step_blockwise_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                             const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                             const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                             const at::Tensor& v_lut,
                             c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                             double beta2, double eps, double weight_decay, int64_t step, bool adamw_mode,
                             bool bias_correction, bool maximize, double grad_scale, bool stochastic_rounding,
                             int64_t seed) {
  check_all(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut, lut_params,
            bits, block, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  TORCH_CHECK_VALUE(param.device().is_cpu(), kOp, ": the CPU kernel got param on ", param.device());
  if (param.numel() == 0) return;
  run_blocks(AdamBlockwiseArgs{param.data_ptr(), grad.const_data_ptr(), elem_type(param, kOp, "param"),
                               elem_type(grad, kOp, "grad"), m_codes.data_ptr<uint8_t>(), m_absmax.data_ptr<float>(),
                               v_codes.data_ptr<uint8_t>(), v_absmax.data_ptr<float>(),
                               tables(m_map, m_lut, lut_params[0], lut_params[1]),
                               tables(v_map, v_lut, lut_params[2], lut_params[3]), int(bits), block, param.numel(),
                               make_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction,
                                           maximize, grad_scale, stochastic_rounding, seed)});
}

void check_lion(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes, const at::Tensor& m_absmax,
                const at::Tensor& m_map, const at::Tensor& m_lut, c10::IntArrayRef lut_params, int64_t bits,
                int64_t block, double lr, double beta1, double beta2, double weight_decay, double grad_scale) {
  check_hyperparameters(kLionOp, lr, beta1, beta2, /*eps=*/0.0, weight_decay, /*step=*/1, grad_scale);
  check_param_grad(kLionOp, param, grad);
  check_format(bits, block, lut_params, 2);
  check_state("m", m_codes, m_absmax, param, bits, block);
  check_tables("m", m_map, m_lut, lut_params[0], lut_params[1], bits);
}

void lion_step_blockwise_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                             const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                             c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                             double beta2, double weight_decay, bool maximize, double grad_scale,
                             bool stochastic_rounding, int64_t seed) {
  check_lion(param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block, lr, beta1, beta2, weight_decay,
             grad_scale);
  TORCH_CHECK_VALUE(param.device().is_cpu(), kLionOp, ": the CPU kernel got param on ", param.device());
  if (param.numel() == 0) return;
  const CodeTables m_tables = tables(m_map, m_lut, lut_params[0], lut_params[1]);
  run_blocks(AdamBlockwiseArgs{param.data_ptr(), grad.const_data_ptr(), elem_type(param, kLionOp, "param"),
                               elem_type(grad, kLionOp, "grad"), m_codes.data_ptr<uint8_t>(),
                               m_absmax.data_ptr<float>(), nullptr, nullptr, m_tables, m_tables, int(bits), block,
                               param.numel(),
                               make_lion_coeffs(lr, beta1, beta2, weight_decay, maximize, grad_scale,
                                                stochastic_rounding, seed)});
}

void lion_step_blockwise_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                              const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                              c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                              double beta2, double weight_decay, bool, double grad_scale, bool, int64_t) {
  check_lion(param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block, lr, beta1, beta2, weight_decay,
             grad_scale);
}

void adam_step_blockwise_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                              const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                              const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                              const at::Tensor& v_lut,
                              c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                              double beta2, double eps, double weight_decay, int64_t step, bool, bool, bool,
                              double grad_scale, bool, int64_t) {
  check_all(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut, lut_params,
            bits, block, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(offload_engine, m) {
  m.def(
      "adam_step_blockwise_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, "
      "Tensor(d!) v_codes, Tensor(e!) v_absmax, Tensor m_map, Tensor m_lut, Tensor v_map, Tensor v_lut, "
      "int[] lut_params, *, int bits, int block, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step, bool adamw_mode=True, bool bias_correction=True, "
      "bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, int seed=0) -> ()");
  m.def(
      "lion_step_blockwise_(Tensor(a!) param, Tensor grad, Tensor(b!) m_codes, Tensor(c!) m_absmax, Tensor m_map, "
      "Tensor m_lut, int[] lut_params, *, int bits, int block, float lr, float beta1, float beta2, "
      "float weight_decay, bool maximize=False, float grad_scale=1.0, bool stochastic_rounding=False, int seed=0) -> ()");
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
