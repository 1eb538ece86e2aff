#include "adam_op_common.h"

#include <c10/util/Exception.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>

namespace offload_engine {

std::string num(double x) {  // see [Note: numbers in messages]; %g reads as ostream's default
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

std::string num(int64_t x) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%" PRId64, x);
  return buf;
}

ElemType elem_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kBFloat16: return ElemType::kBFloat16;
    case at::kHalf: return ElemType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_hyperparameters(const char* op, double lr, double beta1, double beta2, double eps, double weight_decay,
                           int64_t step, double grad_scale, int64_t index_offset) {
  TORCH_CHECK_VALUE(lr >= 0.0 && std::isfinite(lr), op, ": lr must be finite and >= 0, got ", num(lr));
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", num(eps));
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", num(beta1));
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", num(beta2));
  TORCH_CHECK_VALUE(weight_decay >= 0.0 && std::isfinite(weight_decay), op,
                    ": weight_decay must be finite and >= 0, got ", num(weight_decay));
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1 (the count including this step), got ", num(step));
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", num(grad_scale));
  TORCH_CHECK_VALUE(index_offset >= 0, op, ": index_offset must be >= 0 (the index of element 0 in the stochastic-",
                    "rounding stream), got ", num(index_offset));
}

void check_param_grad(const char* op, const at::Tensor& param, const at::Tensor& grad) {
  elem_type(param, op, "param");
  elem_type(grad, op, "grad");
  TORCH_CHECK_VALUE(grad.device() == param.device(), op, ": grad is on ", grad.device(), " but param is on ",
                    param.device());
  // sym_* accessors: the Meta kernels also run under dynamic shapes (torch.compile, opcheck).
  TORCH_CHECK_VALUE(grad.sym_sizes() == param.sym_sizes(), op, ": grad has shape ", grad.sym_sizes(),
                    " but param has shape ", param.sym_sizes());
  TORCH_CHECK_VALUE(param.is_contiguous(), op, ": param must be contiguous, got strides ", param.sym_strides());
  TORCH_CHECK_VALUE(grad.is_contiguous(), op, ": grad must be contiguous, got strides ", grad.sym_strides());
}

void check_kernel_device(const char* op, const char* kernel, const at::Tensor& param, c10::DeviceType type) {
  TORCH_CHECK_VALUE(param.device().type() == type, op, ": the ", kernel, " kernel got param on ", param.device());
}

namespace {
void check_fp32_state(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == param.device(), op, ": ", name, " is on ", t.device(), " but param is on ",
                    param.device());
  TORCH_CHECK_VALUE(t.sym_sizes() == param.sym_sizes(), op, ": ", name, " has shape ", t.sym_sizes(),
                    " but param has shape ", param.sym_sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.sym_strides());
}
}  // namespace

void check_adam_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double grad_scale, int64_t index_offset) {
  check_hyperparameters("adam_step_", lr, beta1, beta2, eps, weight_decay, step, grad_scale, index_offset);
  check_param_grad("adam_step_", param, grad);
  check_fp32_state("adam_step_", "exp_avg", exp_avg, param);
  check_fp32_state("adam_step_", "exp_avg_sq", exp_avg_sq, param);
  if (param.device().type() != c10::DeviceType::Meta && param.numel() > 0) {
    TORCH_CHECK_VALUE(param.data_ptr() != exp_avg.data_ptr() && param.data_ptr() != exp_avg_sq.data_ptr() &&
                          exp_avg.data_ptr() != exp_avg_sq.data_ptr(),
                      "adam_step_: param, exp_avg and exp_avg_sq must be distinct tensors");
  }
}

void check_lion_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, double lr,
                     double beta1, double beta2, double weight_decay, double grad_scale, int64_t index_offset) {
  check_hyperparameters("lion_step_", lr, beta1, beta2, /*eps=*/0.0, weight_decay, /*step=*/1, grad_scale,
                        index_offset);
  check_param_grad("lion_step_", param, grad);
  check_fp32_state("lion_step_", "exp_avg", exp_avg, param);
  if (param.device().type() != c10::DeviceType::Meta && param.numel() > 0) {
    TORCH_CHECK_VALUE(param.data_ptr() != exp_avg.data_ptr(), "lion_step_: param and exp_avg must be distinct tensors");
  }
}

AdamTensorArgs fp32_state_args(const char* op, const at::Tensor& param, const at::Tensor& grad,
                               const at::Tensor& exp_avg, const at::Tensor* exp_avg_sq, const AdamCoeffs& coeffs) {
  return AdamTensorArgs{param.data_ptr(), grad.const_data_ptr(), exp_avg.data_ptr<float>(),
                        exp_avg_sq ? exp_avg_sq->data_ptr<float>() : nullptr, elem_type(param, op, "param"),
                        elem_type(grad, op, "grad"), coeffs};
}

}  // namespace offload_engine
