// CUDA registrations of the ops declared in adam_op.cpp and adam_blockwise_op.cpp (same
// schemas; compiled only in CUDA builds). Each runs the device-independent checks of
// adam_op_common / adam_blockwise_common first, so a bad call reads as it does on the CPU and
// writes nothing, then launches the kernel of cuda/adam_cuda.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../adam_blockwise_common.h"
#include "../adam_op_common.h"
#include "adam_cuda.h"

namespace offload_engine {
namespace {

// [Note: CUDA op streams] The kernels run on the caller's current stream of param's device, so
// they are ordered after whatever produced grad on that stream and before whatever reads param
// next, with no event or synchronisation here; a caller that produced grad on another stream
// records an event there and waits on it in the current stream first, as for any torch op.
cudaStream_t current_stream(const at::Tensor& param) {
  return c10::cuda::getCurrentCUDAStream(param.device().index()).stream();
}

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step, bool adamw_mode, bool bias_correction, bool maximize,
                    double grad_scale, bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_adam_args(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                  index_offset);
  check_kernel_device("adam_step_", "CUDA", param, c10::DeviceType::CUDA);
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());  // launch on param's GPU, whichever is current
  const AdamTensorArgs args = fp32_state_args(
      "adam_step_", param, grad, exp_avg, &exp_avg_sq,
      make_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, maximize, grad_scale,
                  stochastic_rounding, seed, index_offset));
  C10_CUDA_CHECK(cuda::launch_fp32_state_step(args, n, current_stream(param)));  // see [Note: CUDA op streams]
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lion_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, double lr,
                    double beta1, double beta2, double weight_decay, bool maximize, double grad_scale,
                    bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_lion_args(param, grad, exp_avg, lr, beta1, beta2, weight_decay, grad_scale, index_offset);
  check_kernel_device("lion_step_", "CUDA", param, c10::DeviceType::CUDA);
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const AdamTensorArgs args = fp32_state_args(
      "lion_step_", param, grad, exp_avg, nullptr,
      make_lion_coeffs(lr, beta1, beta2, weight_decay, maximize, grad_scale, stochastic_rounding, seed,
                       index_offset));
  C10_CUDA_CHECK(cuda::launch_fp32_state_step(args, n, current_stream(param)));  // see [Note: CUDA op streams]
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adam_step_blockwise_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                              const at::Tensor& m_absmax, const at::Tensor& v_codes, const at::Tensor& v_absmax,
                              const at::Tensor& m_map, const at::Tensor& m_lut, const at::Tensor& v_map,
                              const at::Tensor& v_lut, c10::IntArrayRef lut_params, int64_t bits, int64_t block,
                              double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                              bool adamw_mode, bool bias_correction, bool maximize, double grad_scale,
                              bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_adam_blockwise_args(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut,
                            lut_params, bits, block, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                            index_offset);
  check_kernel_device(kBlockwiseOp, "CUDA", param, c10::DeviceType::CUDA);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const AdamBlockwiseArgs args = adam_blockwise_args(
      param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, m_lut, v_map, v_lut, lut_params, bits, block,
      make_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction, maximize, grad_scale,
                  stochastic_rounding, seed, index_offset));
  C10_CUDA_CHECK(cuda::launch_blockwise_step(args, current_stream(param)));  // see [Note: CUDA op streams]
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lion_step_blockwise_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                              const at::Tensor& m_absmax, const at::Tensor& m_map, const at::Tensor& m_lut,
                              c10::IntArrayRef lut_params, int64_t bits, int64_t block, double lr, double beta1,
                              double beta2, double weight_decay, bool maximize, double grad_scale,
                              bool stochastic_rounding, int64_t seed, int64_t index_offset) {
  check_lion_blockwise_args(param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block, lr, beta1, beta2,
                            weight_decay, grad_scale, index_offset);
  check_kernel_device(kLionBlockwiseOp, "CUDA", param, c10::DeviceType::CUDA);
  if (param.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const AdamBlockwiseArgs args = lion_blockwise_args(
      param, grad, m_codes, m_absmax, m_map, m_lut, lut_params, bits, block,
      make_lion_coeffs(lr, beta1, beta2, weight_decay, maximize, grad_scale, stochastic_rounding, seed,
                       index_offset));
  C10_CUDA_CHECK(cuda::launch_blockwise_step(args, current_stream(param)));  // see [Note: CUDA op streams]
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(offload_engine, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("lion_step_", &lion_step_cuda);
  m.impl("adam_step_blockwise_", &adam_step_blockwise_cuda);
  m.impl("lion_step_blockwise_", &lion_step_blockwise_cuda);
}

}  // namespace offload_engine
