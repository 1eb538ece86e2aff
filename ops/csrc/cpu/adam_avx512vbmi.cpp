// AVX-512 with VBMI (Ice Lake, Sapphire Rapids, Zen 4 and later): the avx512 kernels, except
// that block-quantized state is looked up in byte tables held in registers (quant_vbmi.h)
// instead of with gathers, which are slow on these cores. fp32 state has no lookups, so
// adam_range is the avx512 one.
//
// Headers with plain inline functions come first, so they are compiled for the baseline
// target in every unit; only what follows the pragma uses the wider instructions.
#include <type_traits>
#include "simd_scalar.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vbmi,avx2,fma,f16c")
#include "simd_avx512.h"
#include "quant_vbmi.h"
#include "adam_kernel.h"

namespace offload_engine {

void adam_blocks_avx512vbmi(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  // A map without plane tables (one that does not fit their layout) keeps the gathers.
  if (a.m_planes != nullptr && a.v_planes != nullptr) {
    adam_blocks<simd_avx512::Vec, quant_vbmi::Codec>(a, block_begin, block_end);
  } else {
    adam_blocks<simd_avx512::Vec>(a, block_begin, block_end);
  }
}

}  // namespace offload_engine

#else  // not x86: never selected (cpu_supports() is false), linked for completeness
namespace offload_engine {
void adam_blocks_scalar(const AdamBlockwiseArgs&, int64_t, int64_t);
void adam_blocks_avx512vbmi(const AdamBlockwiseArgs& a, int64_t b0, int64_t b1) { adam_blocks_scalar(a, b0, b1); }
}  // namespace offload_engine
#endif
