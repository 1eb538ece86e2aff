// Adam/AdamW and Lion with fp32 moments on the GPU: the CPU kernel's adam_range() (same
// element math, cuda/device_math.cuh), one grid-stride pass over param, grad and the moments.
#include <cuda_runtime.h>

#include <type_traits>

#include "adam_cuda.h"
#include "device_math.cuh"
#include "launch_utils.cuh"
#include "vector_io.cuh"

namespace offload_engine {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Elements per thread and iteration: two 16-byte words of each fp32 moment, one or two of
// param and grad, so every access is a full 16-byte load or store.
constexpr int kElems = 8;

template <class P, class G>
__device__ __forceinline__ void load_inputs(const P* param, const G* grad, const float* exp_avg,
                                            const float* exp_avg_sq, bool has_v, float (&p)[kElems],
                                            float (&g)[kElems], float (&m)[kElems], float (&v)[kElems]) {
  load_as_float<false>(param, true, kElems, p);
  load_as_float<true>(grad, true, kElems, g);
  load_as_float<false>(exp_avg, true, kElems, m);
  if (has_v) load_as_float<false>(exp_avg_sq, true, kElems, v);
}

// Updates a chunk with arithmetic A: m, v in place, the rounded params into out; returns
// whether some result is NaN.
template <class A, class P>
__device__ __forceinline__ bool update_thread(const float (&p)[kElems], const float (&g)[kElems], float (&m)[kElems],
                                              float (&v)[kElems], P (&out)[kElems], const AdamCoeffs& c, bool has_v,
                                              uint64_t s0) {
  bool nan_seen = false;
#pragma unroll
  for (int j = 0; j < kElems; ++j) {
    const float pj = update_element<A>(p[j], g[j], m[j], v[j], c);
    nan_seen |= any_nan(pj, m[j], v[j], has_v);
    out[j] = round_param<P>(pj, c, s0 + j);
  }
  return nan_seen;
}

// Elements [0, n_vec * kElems) go through aligned 8-element chunks (vectorized: every pointer is
// 16-byte aligned); the rest, and everything when unaligned, one element per thread step.
// Each element's result depends only on its own inputs and its index (which keys the
// stochastic rounding), so the split changes nothing in the results.
template <class P, class G>
__global__ void __launch_bounds__(kThreads)
    fp32_state_kernel(const AdamTensorArgs a, const int64_t n, const bool vectorized) {
  const AdamCoeffs& c = a.coeffs;
  P* param = static_cast<P*>(a.param);
  const G* grad = static_cast<const G*>(a.grad);
  float* exp_avg = a.exp_avg;
  float* exp_avg_sq = a.exp_avg_sq;
  const bool has_v = !c.lion;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t thread = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n_vec = vectorized ? n / kElems : 0;

  for (int64_t k = thread; k < n_vec; k += stride) {
    const int64_t i0 = k * kElems;
    float p[kElems], g[kElems], m[kElems], v[kElems];
    load_inputs(param + i0, grad + i0, exp_avg + i0, exp_avg_sq + i0, has_v, p, g, m, v);
    P out[kElems];
    const uint64_t s0 = c.index_offset + uint64_t(i0);  // the chunk's first index in the rounding stream
    if (update_thread<IeeeArith>(p, g, m, v, out, c, has_v, s0)) {
      // Rare: some result is NaN; redo the chunk for x86's NaN bits ([Note: x86 NaN results]).
      load_inputs(param + i0, grad + i0, exp_avg + i0, exp_avg_sq + i0, has_v, p, g, m, v);  // nothing stored yet
      update_thread<X86Arith>(p, g, m, v, out, c, has_v, s0);
    }
    store_elems(param + i0, true, kElems, out);
    store_elems(exp_avg + i0, true, kElems, m);
    if (has_v) store_elems(exp_avg_sq + i0, true, kElems, v);
  }
  for (int64_t i = n_vec * kElems + thread; i < n; i += stride) {
    const float p_in = to_float(param[i]), g_in = to_float(grad[i]);
    float m = exp_avg[i], v = has_v ? exp_avg_sq[i] : 0.0f;
    float p = update_element<IeeeArith>(p_in, g_in, m, v, c);
    if (any_nan(p, m, v, has_v)) {  // [Note: x86 NaN results]
      m = exp_avg[i], v = has_v ? exp_avg_sq[i] : 0.0f;
      p = update_element<X86Arith>(p_in, g_in, m, v, c);
    }
    param[i] = round_param<P>(p, c, c.index_offset + uint64_t(i));
    exp_avg[i] = m;
    if (has_v) exp_avg_sq[i] = v;
  }
}

}  // namespace

cudaError_t launch_fp32_state_step(const AdamTensorArgs& a, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vectorized = aligned(a.param, 16) && aligned(a.grad, 16) && aligned(a.exp_avg, 16) &&
                          (a.coeffs.lion || aligned(a.exp_avg_sq, 16));
  return with_elem_types(a.param_type, a.grad_type, [&](auto* p_tag, auto* g_tag) -> cudaError_t {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using G = std::remove_pointer_t<decltype(g_tag)>;
    const auto kernel = fp32_state_kernel<P, G>;
    const int64_t work = vectorized ? n / kElems + n % kElems : n;  // thread steps of work
    int grid = 1;
    cudaError_t err = grid_size(kernel, kThreads, 0, (work + kThreads - 1) / kThreads, &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, 0, stream>>>(a, n, vectorized);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace offload_engine
