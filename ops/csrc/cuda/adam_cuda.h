// Host entry points of the CUDA kernels. Plain C++ over the same argument structs as the CPU
// kernels (cpu/adam_args.h) and a stream: no torch headers, so the .cu files compile with nvcc
// alone (tests/test_cuda_build.py does that on machines without a GPU), and the torch
// registration (adam_cuda_op.cpp) is the only place that knows about tensors.
//
// Each launcher enqueues its kernel on `stream` and returns the first CUDA error of the
// launch (cudaSuccess otherwise); it never synchronises. Pointers are device pointers.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../cpu/adam_args.h"

namespace offload_engine {
namespace cuda {

// Adam/AdamW (or Lion, when a.coeffs.lion; then a.exp_avg_sq is unused) over the n elements of
// one tensor with fp32 moments; bit-identical to the CPU kernel's adam_range().
cudaError_t launch_fp32_state_step(const AdamTensorArgs& a, int64_t n, cudaStream_t stream);

// The block-quantized step over all a.numel elements (blocks of a.block, 8- or 4-bit codes);
// bit-identical to the CPU kernel's adam_blocks(): params, codes and absmax.
cudaError_t launch_blockwise_step(const AdamBlockwiseArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace offload_engine
