// Run-time choice of the CPU kernel: the widest path this CPU supports, unless the
// OFFLOAD_ENGINE_SIMD environment variable forces one (auto|avx512vbmi|avx512|avx2|scalar).
#pragma once
#include <string>
#include <vector>
#include "adam_args.h"

namespace offload_engine {

enum class SimdPath : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi = 3 };

const char* simd_path_name(SimdPath path);
bool cpu_supports(SimdPath path);
std::vector<std::string> supported_simd_paths();
// Reads OFFLOAD_ENGINE_SIMD on every call (so tests and users can switch paths at run
// time); throws a ValueError naming the variable for unknown or unsupported values.
SimdPath selected_simd_path();
AdamRangeFn adam_range_for(SimdPath path);
AdamBlockwiseFn adam_blocks_for(SimdPath path);

}  // namespace offload_engine
