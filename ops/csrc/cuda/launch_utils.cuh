// Host-side helpers shared by the CUDA launchers: the param/grad type switch, alignment tests
// and the size of a grid-stride launch.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../cpu/adam_args.h"

namespace offload_engine {
namespace cuda {

// Calls fn(P*, G*) with null pointers of the param and grad element types (as with_elem_types
// in cpu/adam_kernel.h), so one switch picks each kernel's template instantiation.
template <class Fn>
inline cudaError_t with_elem_types(ElemType param_type, ElemType grad_type, Fn&& fn) {
  auto with_grad = [&](auto* param_tag) -> cudaError_t {
    switch (grad_type) {
      case ElemType::kFloat32: return fn(param_tag, static_cast<float*>(nullptr));
      case ElemType::kBFloat16: return fn(param_tag, static_cast<bf16_t*>(nullptr));
      case ElemType::kFloat16: return fn(param_tag, static_cast<f16_t*>(nullptr));
    }
    return cudaErrorInvalidValue;
  };
  switch (param_type) {
    case ElemType::kFloat32: return with_grad(static_cast<float*>(nullptr));
    case ElemType::kBFloat16: return with_grad(static_cast<bf16_t*>(nullptr));
    case ElemType::kFloat16: return with_grad(static_cast<f16_t*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for a grid-stride kernel: enough to fill every SM as far as occupancy allows, never
// more than there is work for. A grid sized to what is resident avoids a second, partial wave.
template <class Kernel>
inline cudaError_t grid_size(Kernel kernel, int threads, size_t smem_bytes, int64_t work_blocks, int* grid) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes);
  if (err != cudaSuccess) return err;
  const int64_t resident = int64_t(sms) * std::max(per_sm, 1);
  *grid = int(std::max<int64_t>(1, std::min(resident, work_blocks)));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace offload_engine
