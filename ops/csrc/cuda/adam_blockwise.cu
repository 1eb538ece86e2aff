// Adam/AdamW and Lion with block-quantized moments (8-bit or 4-bit codes, one fp32 absmax per
// block) on the GPU: the CPU kernel's adam_blocks() ([Note: blockwise step] in
// cpu/adam_kernel.h), bit for bit.
//
// [Note: CUDA blockwise layout] A group of B/8 threads owns one quantization block of B
// elements, 8 consecutive elements per thread: it dequantizes them (map[code] * absmax),
// runs the element update in registers, reduces the new absmax over the group (warp shuffles,
// then shared memory across warps when the group spans several), and requantizes through the
// packed lookup table. A CTA is 256 threads (B <= 2048: 256*8/B groups) or 512 (B = 4096:
// one group), and strides over the tensor's blocks. The code maps and lookup tables are
// copied to shared memory once per CTA when they fit, else read from global memory.
#include <cuda_runtime.h>

#include <type_traits>

#include "adam_cuda.h"
#include "device_math.cuh"
#include "launch_utils.cuh"
#include "vector_io.cuh"

namespace offload_engine {
namespace cuda {
namespace {

constexpr int kElems = 8;          // elements per thread
constexpr int kMinThreads = 256;   // CTA size for blocks up to 2048 elements
constexpr int kMaxThreads = int(kMaxBlock / kElems);  // 512: one 4096-element block per CTA
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr size_t kStaticSmemLimit = 48 * 1024;  // dynamic shared memory without an opt-in

struct Launch {
  int group_threads;   // threads per quantization block: block / kElems
  int groups_per_cta;
  int64_t n_blocks;
  bool vector_params;  // param and grad 16-byte aligned
  bool vector_codes;   // codes aligned for 8-byte (8-bit) or 4-byte (4-bit) accesses
  bool tables_in_smem;
};

struct Tables {
  const float* map;
  const int32_t* lut;
  int32_t min_exponent, mantissa_bits, keys_per_sign;
  __device__ uint32_t code(float x) const { return quantize(x, lut, min_exponent, mantissa_bits, keys_per_sign); }
};

// Max over the group of `group_threads` consecutive threads containing this one, returned to
// every thread of the group. Inputs are never NaN (see max_new_first), so the order of the
// reduction cannot change the result. `red` holds one slot per warp.
__device__ __forceinline__ float group_max(float x, int group_threads, float* red) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float other = __shfl_xor_sync(0xFFFFFFFFU, x, offset);
    if (offset < group_threads) x = max_new_first(other, x);
  }
  if (group_threads > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) red[warp] = x;
    __syncthreads();  // every warp's partial max is in shared memory before any is read
    const int first_warp = (threadIdx.x / group_threads) * (group_threads / 32);
    x = red[first_warp];
    for (int w = 1; w < group_threads / 32; ++w) x = max_new_first(red[first_warp + w], x);
  }
  return x;
}

// Dequantizes and updates a thread's kElems elements with arithmetic A (IeeeArith, or X86Arith
// to redo them: [Note: x86 NaN results]); returns whether some result is NaN. Elements past the
// tensor's end are computed on zeros and never stored.
template <class A, class P, class W>
__device__ __forceinline__ bool update_thread(const Tables& mt, const Tables& vt, W m_word, W v_word, float m_scale,
                                              float v_scale, bool has_v, const float (&p)[kElems],
                                              const float (&g)[kElems], float (&m)[kElems], float (&v)[kElems],
                                              P (&out)[kElems], const AdamCoeffs& c, uint64_t stream_first) {
  using Word = CodeWord<sizeof(W) == 8 ? 8 : 4>;
  bool nan_seen = false;
#pragma unroll
  for (int j = 0; j < kElems; ++j) {
    m[j] = A::mul(mt.map[Word::get(m_word, j)], m_scale);
    v[j] = has_v ? A::mul(vt.map[Word::get(v_word, j)], v_scale) : 0.0f;
    const float pj = update_element<A>(p[j], g[j], m[j], v[j], c);
    nan_seen |= any_nan(pj, m[j], v[j], has_v);
    out[j] = round_param<P>(pj, c, stream_first + j);
  }
  return nan_seen;
}

// The codes of a thread's values (x * inv through the lookup table); 0 past the tensor's end.
template <class A>
__device__ __forceinline__ void quantize_thread(const Tables& t, const float (&x)[kElems], float inv, int valid,
                                                uint32_t (&codes)[kElems]) {
#pragma unroll
  for (int j = 0; j < kElems; ++j) codes[j] = j < valid ? t.code(A::mul(x[j], inv)) : 0;
}

__device__ __forceinline__ bool is_inf(float x) { return (f2u(x) & 0x7FFFFFFFU) == 0x7F800000U; }

// Copies n 4-byte values into shared memory, all threads of the CTA cooperating.
template <class T>
__device__ __forceinline__ T* stage(T* dst, const T* src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  return dst;
}

template <class P, class G, int kBits>
// Min blocks 1: lets ptxas use the registers it needs (about 70-80) rather than spill to keep 64.
__global__ void __launch_bounds__(kMaxThreads, 1) blockwise_kernel(const AdamBlockwiseArgs a, const Launch L) {
  using Word = CodeWord<kBits>;
  constexpr int kCodes = 1 << kBits;
  const AdamCoeffs& c = a.coeffs;
  const bool has_v = !c.lion;  // Lion keeps only exp_avg: every v access is skipped
  extern __shared__ float4 smem_words[];
  float* red_m = reinterpret_cast<float*>(smem_words);
  float* red_v = red_m + kMaxWarps;

  Tables mt{a.m_tables.map, a.m_tables.lut, a.m_tables.min_exponent, a.m_tables.mantissa_bits,
            a.m_tables.keys_per_sign};
  Tables vt{a.v_tables.map, a.v_tables.lut, a.v_tables.min_exponent, a.v_tables.mantissa_bits,
            a.v_tables.keys_per_sign};
  if (L.tables_in_smem) {
    float* maps = red_v + kMaxWarps;
    int32_t* luts = reinterpret_cast<int32_t*>(maps + 2 * kCodes);
    mt.map = stage(maps, a.m_tables.map, kCodes);
    mt.lut = stage(luts, a.m_tables.lut, 2 * mt.keys_per_sign);
    if (has_v) {
      vt.map = stage(maps + kCodes, a.v_tables.map, kCodes);
      vt.lut = stage(luts + 2 * mt.keys_per_sign, a.v_tables.lut, 2 * vt.keys_per_sign);
    }
    __syncthreads();  // the tables are complete before any thread looks a code up
  }

  P* param = static_cast<P*>(a.param);
  const G* grad = static_cast<const G*>(a.grad);
  const int64_t B = a.block;
  const int group = threadIdx.x / L.group_threads;
  const int lane = threadIdx.x % L.group_threads;

  // Every thread runs the same number of iterations (the barriers in group_max need that).
  for (int64_t tile = blockIdx.x; tile * L.groups_per_cta < L.n_blocks; tile += gridDim.x) {
    const int64_t blk = tile * L.groups_per_cta + group;
    const bool active = blk < L.n_blocks;
    const int64_t first = blk * B + int64_t(lane) * kElems;  // this thread's first element
    const int64_t left = a.numel - first;
    const int valid = active ? int(left < 0 ? 0 : (left < kElems ? left : kElems)) : 0;

    float m[kElems], v[kElems];
    float m_max = 0.0f, v_max = 0.0f;
    bool nan_seen = false;
    if (valid > 0) {
      const auto m_word = Word::load(a.m_codes, first, L.vector_codes);
      const float m_scale = a.m_absmax[blk];
      decltype(Word::load(a.m_codes, first, L.vector_codes)) v_word{};
      float v_scale = 0.0f;
      if (has_v) {
        v_word = Word::load(a.v_codes, first, L.vector_codes);
        v_scale = a.v_absmax[blk];
      }
      float p[kElems], g[kElems];
      load_as_float<false>(param + first, L.vector_params, valid, p);
      load_as_float<true>(grad + first, L.vector_params, valid, g);
      P out[kElems];
      const uint64_t stream_first = c.index_offset + uint64_t(first);  // keys the stochastic rounding
      nan_seen = update_thread<IeeeArith>(mt, vt, m_word, v_word, m_scale, v_scale, has_v, p, g, m, v, out, c,
                                          stream_first);
      if (nan_seen) {  // rare: redo the thread's elements for x86's NaN bits ([Note: x86 NaN results])
        load_as_float<false>(param + first, L.vector_params, valid, p);  // nothing is stored yet
        load_as_float<true>(grad + first, L.vector_params, valid, g);
        update_thread<X86Arith>(mt, vt, m_word, v_word, m_scale, v_scale, has_v, p, g, m, v, out, c, stream_first);
      }
#pragma unroll
      for (int j = 0; j < kElems; ++j) {
        if (j < valid) {
          m_max = max_new_first(abs_bits(m[j]), m_max);  // new value first: a NaN is ignored
          if (has_v) v_max = max_new_first(v[j], v_max);
        }
      }
      store_elems(param + first, L.vector_params, valid, out);
    }
    m_max = group_max(m_max, L.group_threads, red_m);
    if (has_v) v_max = group_max(v_max, L.group_threads, red_v);
    if (active) {
      // A block whose absmax is zero or subnormal is flushed to the zero code (1 / absmax would
      // overflow), as inverse_absmax() does on the CPU. Codes past the tensor's end are 0.
      // x * inv is NaN only for a NaN x or inf * 0 (an infinite absmax): then the NaN's sign,
      // as x86 makes it, picks the code (X86Arith).
      const bool x86 = nan_seen || is_inf(m_max) || is_inf(v_max);
      const float m_inv = m_max >= 0x1p-126f ? div(1.0f, m_max) : 0.0f;
      uint32_t codes[kElems];
      if (x86) quantize_thread<X86Arith>(mt, m, m_inv, valid, codes);
      else quantize_thread<IeeeArith>(mt, m, m_inv, valid, codes);
      Word::store(a.m_codes, first, L.vector_codes, codes);
      if (has_v) {
        const float v_inv = v_max >= 0x1p-126f ? div(1.0f, v_max) : 0.0f;
        if (x86) quantize_thread<X86Arith>(vt, v, v_inv, valid, codes);
        else quantize_thread<IeeeArith>(vt, v, v_inv, valid, codes);
        Word::store(a.v_codes, first, L.vector_codes, codes);
      }
      // Every thread of the group read the old absmax before the reduction it fed, so the
      // group's first thread may overwrite it now.
      if (lane == 0) {
        a.m_absmax[blk] = m_max;
        if (has_v) a.v_absmax[blk] = v_max;
      }
    }
    if (L.group_threads > 32) __syncthreads();  // red_m/red_v are read before the next tile writes them
  }
}

size_t table_bytes(const AdamBlockwiseArgs& a) {
  const size_t codes = size_t(1) << a.bits;
  const size_t lut_entries =
      2 * size_t(a.m_tables.keys_per_sign) + (a.coeffs.lion ? 0 : 2 * size_t(a.v_tables.keys_per_sign));
  return (2 * codes + lut_entries) * sizeof(float);
}

template <int kBits>
cudaError_t launch_bits(const AdamBlockwiseArgs& a, cudaStream_t stream) {
  Launch L{};
  L.group_threads = int(a.block / kElems);
  const int threads = L.group_threads > kMinThreads ? L.group_threads : kMinThreads;
  L.groups_per_cta = threads / L.group_threads;
  L.n_blocks = (a.numel + a.block - 1) / a.block;
  L.vector_params = aligned(a.param, 16) && aligned(a.grad, 16);
  L.vector_codes = aligned(a.m_codes, CodeWord<kBits>::kAlign) &&
                   (a.coeffs.lion || aligned(a.v_codes, CodeWord<kBits>::kAlign));
  const size_t reduce_bytes = 2 * kMaxWarps * sizeof(float);
  L.tables_in_smem = reduce_bytes + table_bytes(a) <= kStaticSmemLimit;
  const size_t smem = reduce_bytes + (L.tables_in_smem ? table_bytes(a) : 0);
  return with_elem_types(a.param_type, a.grad_type, [&](auto* p_tag, auto* g_tag) -> cudaError_t {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using G = std::remove_pointer_t<decltype(g_tag)>;
    const auto kernel = blockwise_kernel<P, G, kBits>;
    const int64_t tiles = (L.n_blocks + L.groups_per_cta - 1) / L.groups_per_cta;
    int grid = 1;
    cudaError_t err = grid_size(kernel, threads, smem, tiles, &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, threads, smem, stream>>>(a, L);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_blockwise_step(const AdamBlockwiseArgs& a, cudaStream_t stream) {
  if (a.numel <= 0) return cudaSuccess;
  if (a.block < 64 || a.block > kMaxBlock || (a.block & (a.block - 1)) != 0) return cudaErrorInvalidValue;
  if (a.bits == 8) return launch_bits<8>(a, stream);
  if (a.bits == 4) return launch_bits<4>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace offload_engine
