// Argument checks and step coefficients shared by the Adam ops (adam_op.cpp,
// adam_blockwise_op.cpp). Every check runs before any element is written, so a rejected call
// changes nothing.
#pragma once
#include <ATen/core/Tensor.h>

#include "cpu/adam_args.h"

namespace offload_engine {

ElemType elem_type(const at::Tensor& t, const char* op, const char* name);
void check_hyperparameters(const char* op, double lr, double beta1, double beta2, double eps, double weight_decay,
                           int64_t step, double grad_scale);
// param and grad: supported dtypes, same device and shape, contiguous.
void check_param_grad(const char* op, const at::Tensor& param, const at::Tensor& grad);
AdamCoeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                       bool adamw_mode, bool bias_correction, bool maximize, double grad_scale,
                       bool stochastic_rounding, int64_t seed);
// Lion: no bias correction, decoupled weight decay, no eps, no exp_avg_sq.
AdamCoeffs make_lion_coeffs(double lr, double beta1, double beta2, double weight_decay, bool maximize,
                            double grad_scale, bool stochastic_rounding, int64_t seed);

}  // namespace offload_engine
