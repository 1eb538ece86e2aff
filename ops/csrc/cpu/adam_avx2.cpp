// AVX2 path. FMA is enabled only because the CPU check demands it; -ffp-contract=off keeps
// mul+add unfused so results match the scalar path.
//
// Headers with plain inline functions come first, so they are compiled for the baseline
// target in every unit; only what follows the pragma uses the wider instructions.
#include <type_traits>
#include "simd_scalar.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")
#include "simd_avx2.h"
#include "adam_kernel.h"

namespace offload_engine {

void adam_range_avx2(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  adam_range<simd_avx2::Vec>(a, begin, end);
}

void adam_blocks_avx2(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  adam_blocks<simd_avx2::Vec>(a, block_begin, block_end);
}

}  // namespace offload_engine

#else  // not x86: never selected (cpu_supports() is false), linked for completeness
namespace offload_engine {
void adam_range_scalar(const AdamTensorArgs&, int64_t, int64_t);
void adam_range_avx2(const AdamTensorArgs& a, int64_t begin, int64_t end) { adam_range_scalar(a, begin, end); }
void adam_blocks_scalar(const AdamBlockwiseArgs&, int64_t, int64_t);
void adam_blocks_avx2(const AdamBlockwiseArgs& a, int64_t b0, int64_t b1) { adam_blocks_scalar(a, b0, b1); }
}  // namespace offload_engine
#endif
