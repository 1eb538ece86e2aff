// Portable scalar path (baseline x86-64 or any other CPU).
//
// Headers with plain inline functions come first, so they are compiled for the baseline
// target in every unit; only what follows the pragma uses the wider instructions.
#include <type_traits>
#include "simd_scalar.h"
#include "adam_kernel.h"

namespace offload_engine {

void adam_range_scalar(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  adam_range<simd_scalar::Vec>(a, begin, end);
}

void adam_blocks_scalar(const AdamBlockwiseArgs& a, int64_t block_begin, int64_t block_end) {
  adam_blocks<simd_scalar::Vec>(a, block_begin, block_end);
}

}  // namespace offload_engine
