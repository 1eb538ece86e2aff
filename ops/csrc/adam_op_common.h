// Argument checks, step coefficients and kernel argument structs shared by the Adam/Lion ops
// of every device (adam_op.cpp and adam_blockwise_op.cpp for CPU and Meta, cuda/adam_cuda_op.cpp
// for CUDA), so a bad call reads the same whichever kernel it reaches. Every check runs before
// any element is written, so a rejected call changes nothing.
#pragma once
#include <ATen/core/Tensor.h>

#include "cpu/adam_args.h"

namespace offload_engine {

// [Note: numbers in messages] The numbers in our error messages are formatted by num() (with
// snprintf), never by writing them to a std::ostream here (TORCH_CHECK's c10::str). Built with
// a newer GCC than the torch wheel's (g++ 13.3 against torch 2.11+cu130, seen on the H100
// machine), an extension's own ostream number formatting crashes the process, so a bad
// argument would end in a segfault instead of its ValueError. Sizes, devices and dtypes are
// formatted inside torch's libraries and are safe.
std::string num(double x);
std::string num(int64_t x);

ElemType elem_type(const at::Tensor& t, const char* op, const char* name);
void check_hyperparameters(const char* op, double lr, double beta1, double beta2, double eps, double weight_decay,
                           int64_t step, double grad_scale, int64_t index_offset);
// param and grad: supported dtypes, same device and shape, contiguous.
void check_param_grad(const char* op, const at::Tensor& param, const at::Tensor& grad);
// make_coeffs and make_lion_coeffs: cpu/adam_args.h (torch-free, cpu/adam_coeffs.cpp).

// ---- fp32-state ops (adam_step_, lion_step_) ----
void check_adam_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step, double grad_scale, int64_t index_offset);
void check_lion_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, double lr,
                     double beta1, double beta2, double weight_decay, double grad_scale, int64_t index_offset);
// The kernel arguments of a checked call (exp_avg_sq may be undefined: Lion).
AdamTensorArgs fp32_state_args(const char* op, const at::Tensor& param, const at::Tensor& grad,
                               const at::Tensor& exp_avg, const at::Tensor* exp_avg_sq, const AdamCoeffs& coeffs);
// A device check after the shared ones: `kernel` names the registration ("CPU", "CUDA").
void check_kernel_device(const char* op, const char* kernel, const at::Tensor& param, c10::DeviceType type);

}  // namespace offload_engine
