// CUDA managed (unified) memory for store="managed" (offload_engine/paging/managed_store.py):
// the bitsandbytes-style paged state, kept beside our explicit pinned-copy pipeline for
// comparison. Three ops, CUDA builds only:
//
//   managed_supported(int device) -> bool          the device can prefetch managed memory
//   managed_empty(int nbytes, int device) -> Tensor  uint8 CUDA tensor over cudaMallocManaged
//   managed_prefetch(Tensor t, int device) -> ()   migrate t's bytes to `device` (-1: the host)
//                                                  on the current stream, asynchronously
//
// Managed memory is not counted by torch's caching allocator, so the Python side refuses an
// allocation larger than the GPU's free memory before calling managed_empty: a program that
// asks for more managed memory than the card has free can stall the whole GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../adam_op_common.h"

namespace offload_engine {
namespace {

bool managed_supported(int64_t device) {
  int concurrent = 0;
  // Prefetching needs concurrent managed access (Linux with a Pascal or newer GPU; not WSL,
  // not some virtual machines): without it the driver migrates only on whole-kernel faults.
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess,
                                        static_cast<int>(device)));
  return concurrent != 0;
}

at::Tensor managed_empty(int64_t nbytes, int64_t device) {
  TORCH_CHECK(nbytes >= 0, "managed_empty: nbytes must be >= 0, got ", num(nbytes));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* ptr = nullptr;
  if (nbytes > 0) {
    C10_CUDA_CHECK(cudaMallocManaged(&ptr, static_cast<size_t>(nbytes), cudaMemAttachGlobal));
  }
  auto options = at::TensorOptions().dtype(at::kByte).device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  // The tensor owns the allocation: cudaFree when its storage dies (cudaFree waits for the
  // device, so no kernel still reading a page can see it freed).
  return at::from_blob(ptr, {nbytes}, [](void* p) { if (p) cudaFree(p); }, options);
}

void managed_prefetch(const at::Tensor& t, int64_t device) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "managed_prefetch: needs a contiguous CUDA tensor over managed memory");
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (nbytes == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  // Ordered on the caller's current stream like any op ([Note: CUDA op streams]).
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#if CUDART_VERSION >= 13000
  cudaMemLocation where{};
  where.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  where.id = device < 0 ? 0 : static_cast<int>(device);
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), nbytes, where, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), nbytes, device < 0 ? cudaCpuDeviceId : static_cast<int>(device),
                                      stream));
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(offload_engine, m) {
  m.def("managed_supported(int device) -> bool", &managed_supported);
  m.def("managed_empty(int nbytes, int device) -> Tensor", &managed_empty);
  m.def("managed_prefetch(Tensor t, int device) -> ()");
}

TORCH_LIBRARY_IMPL(offload_engine, CUDA, m) {
  m.impl("managed_prefetch", &managed_prefetch);
}

}  // namespace offload_engine
