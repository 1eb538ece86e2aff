// Argument checks and kernel argument structs of the block-quantized ops
// (adam_step_blockwise_, lion_step_blockwise_), shared by every device's registration
// (adam_blockwise_op.cpp for CPU and Meta, cuda/adam_cuda_op.cpp for CUDA).
#pragma once
#include <ATen/core/Tensor.h>

#include "cpu/adam_args.h"

namespace offload_engine {

constexpr const char* kBlockwiseOp = "adam_step_blockwise_";
constexpr const char* kLionBlockwiseOp = "lion_step_blockwise_";

void check_adam_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                               const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                               const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                               const at::Tensor& v_lut, c10::IntArrayRef lut_params, int64_t bits, int64_t block,
                               double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                               double grad_scale, int64_t index_offset);
void check_lion_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                               const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                               c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                               double beta2, double weight_decay, double grad_scale, int64_t index_offset);

// The kernel arguments of a checked call. Lion passes no v state: v_* are null, and the
// v tables repeat the m tables (never read).
AdamBlockwiseArgs adam_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                                      const at::Tensor& m_absmax, const at::Tensor& v_codes,
                                      const at::Tensor& v_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                                      const at::Tensor& v_map, const at::Tensor& v_lut, c10::IntArrayRef lut_params,
                                      int64_t bits, int64_t block, const AdamCoeffs& coeffs);
AdamBlockwiseArgs lion_blockwise_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                                      const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                                      c10::IntArrayRef lut_params, int64_t bits, int64_t block,
                                      const AdamCoeffs& coeffs);

}  // namespace offload_engine
