#include "adam_blockwise_common.h"

#include <c10/util/Exception.h>

#include "adam_op_common.h"

namespace offload_engine {
namespace {

constexpr const char* kOp = kBlockwiseOp;

void check_tables(const char* name, const at::Tensor& map, const at::Tensor& lut, int64_t min_exponent,
                  int64_t mantissa_bits, int64_t bits, const at::Tensor& param) {
  const int64_t codes = int64_t(1) << bits;
  TORCH_CHECK_TYPE(map.scalar_type() == at::kFloat, kOp, ": ", name, "_map must be float32, got ", map.scalar_type());
  TORCH_CHECK_VALUE(map.dim() == 1 && map.sym_numel() == codes && map.is_contiguous(), kOp, ": ", name,
                    "_map must be a contiguous 1-D tensor of ", num(codes), " values for ", num(bits), "-bit codes, got shape ",
                    map.sym_sizes());
  TORCH_CHECK_VALUE(mantissa_bits >= 0 && mantissa_bits <= 11 && min_exponent >= 1 && min_exponent <= 127, kOp, ": ",
                    name, " lookup parameters out of range (min_exponent ", num(min_exponent), ", mantissa_bits ",
                    num(mantissa_bits), ")");
  const int64_t keys = 2 * (1 + ((128 - min_exponent) << mantissa_bits));
  TORCH_CHECK_TYPE(lut.scalar_type() == at::kInt, kOp, ": ", name, "_lut must be int32, got ", lut.scalar_type());
  TORCH_CHECK_VALUE(lut.dim() == 1 && lut.is_contiguous() && lut.sym_numel() == keys, kOp, ": ", name,
                    "_lut must be a contiguous 1-D int32 tensor of ", num(keys), " entries, got ", lut.sym_sizes());
  // The kernel reads the tables where it runs: a CUDA param needs them on its GPU.
  TORCH_CHECK_VALUE(map.device() == param.device() && lut.device() == param.device(), kOp, ": ", name,
                    "_map and ", name, "_lut are on ", map.device(), " and ", lut.device(), " but param is on ",
                    param.device());
}

void check_state(const char* name, const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& param,
                 int64_t bits, int64_t block) {
  // SymInt arithmetic: under dynamic shapes (opcheck, torch.compile) sizes are symbolic.
  const c10::SymInt n = param.sym_numel();
  const c10::SymInt blocks = (n + block - 1) / block;
  const c10::SymInt code_bytes = blocks * block * bits / 8;
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, kOp, ": ", name, "_codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 1 && codes.sym_numel() == code_bytes && codes.is_contiguous(), kOp, ": ", name,
                    "_codes must be a contiguous 1-D tensor of ", code_bytes, " bytes (", blocks, " blocks of ", num(block),
                    " ", num(bits), "-bit codes), got shape ", codes.sym_sizes());
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
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, kOp, ": bits must be 8 or 4, got ", num(bits));
  TORCH_CHECK_VALUE(block >= 64 && block <= kMaxBlock && (block & (block - 1)) == 0, kOp,
                    ": block must be a power of two from 64 to ", num(kMaxBlock), ", got ", num(block));
  TORCH_CHECK_VALUE(lut_params.size() == n_params, kOp, ": lut_params must hold ", num(int64_t(n_params)),
                    " values (min_exponent, mantissa_bits per map)");
}

CodeTables tables(const at::Tensor& map, const at::Tensor& lut, int64_t min_exponent, int64_t mantissa_bits) {
  return CodeTables{map.const_data_ptr<float>(), lut.const_data_ptr<int32_t>(),
                    int32_t(min_exponent), int32_t(mantissa_bits),
                    int32_t(1 + ((128 - min_exponent) << mantissa_bits))};
}

}  // namespace

void check_adam_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                               const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                               const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                               const at::Tensor& v_lut, c10::IntArrayRef lut_params, int64_t bits, int64_t block,
                               double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                               double grad_scale, int64_t index_offset) {
  check_hyperparameters(kOp, lr, beta1, beta2, eps, weight_decay, step, grad_scale, index_offset);
  check_param_grad(kOp, param, grad);
  check_format(bits, block, lut_params, 4);
  check_state("m", m_codes, m_absmax, param, bits, block);
  check_state("v", v_codes, v_absmax, param, bits, block);
  check_tables("m", m_map, m_lut, lut_params[0], lut_params[1], bits, param);
  check_tables("v", v_map, v_lut, lut_params[2], lut_params[3], bits, param);
  if (param.device().type() != c10::DeviceType::Meta && param.numel() > 0) {
    TORCH_CHECK_VALUE(m_codes.data_ptr() != v_codes.data_ptr() && m_absmax.data_ptr() != v_absmax.data_ptr(), kOp,
                      ": exp_avg and exp_avg_sq state must be distinct tensors");
  }
}

void check_lion_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                               const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                               c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                               double beta2, double weight_decay, double grad_scale, int64_t index_offset) {
  check_hyperparameters(kLionBlockwiseOp, lr, beta1, beta2, /*eps=*/0.0, weight_decay, /*step=*/1, grad_scale,
                        index_offset);
  check_param_grad(kLionBlockwiseOp, param, grad);
  check_format(bits, block, lut_params, 2);
  check_state("m", m_codes, m_absmax, param, bits, block);
  check_tables("m", m_map, m_lut, lut_params[0], lut_params[1], bits, param);
}

AdamBlockwiseArgs adam_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                                      const at::Tensor& m_absmax, const at::Tensor& v_codes,
                                      const at::Tensor& v_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                                      const at::Tensor& v_map, const at::Tensor& v_lut, c10::IntArrayRef lut_params,
                                      int64_t bits, int64_t block, const AdamCoeffs& coeffs) {
  return AdamBlockwiseArgs{param.data_ptr(), grad.const_data_ptr(), elem_type(param, kOp, "param"),
                           elem_type(grad, kOp, "grad"), m_codes.data_ptr<uint8_t>(), m_absmax.data_ptr<float>(),
                           v_codes.data_ptr<uint8_t>(), v_absmax.data_ptr<float>(),
                           tables(m_map, m_lut, lut_params[0], lut_params[1]),
                           tables(v_map, v_lut, lut_params[2], lut_params[3]), nullptr, nullptr, int(bits), block,
                           param.numel(),
                           coeffs};
}

AdamBlockwiseArgs lion_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                                      const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                                      c10::IntArrayRef lut_params, int64_t bits, int64_t block,
                                      const AdamCoeffs& coeffs) {
  const CodeTables m_tables = tables(m_map, m_lut, lut_params[0], lut_params[1]);
  return AdamBlockwiseArgs{param.data_ptr(), grad.const_data_ptr(), elem_type(param, kLionBlockwiseOp, "param"),
                           elem_type(grad, kLionBlockwiseOp, "grad"), m_codes.data_ptr<uint8_t>(),
                           m_absmax.data_ptr<float>(), nullptr, nullptr, m_tables, m_tables, nullptr, nullptr, int(bits), block,
                           param.numel(), coeffs};
}

}  // namespace offload_engine
